"""Concept associations by InterPLM's rule (Simon & Zou 2024/2025): latent x per-residue concept F1.

Concepts are annotated regions of the atlas proteins: each Pfam family (``pfam:PF00069``), each
UniProt feature type (``feature:signal peptide``, ``feature:transmembrane region``, ...; bookkeeping
types such as chain / variant / conflict are left out), NLS motifs, and secondary structure (UniProt
HELIX/STRAND/TURN features, or computed from atlas structures by ``secondary.py``).  The names and
``concept_key`` live in ``plmscope.vocab``.

The rule
--------
Proteins are split into *validation* and *test* by homology: whole MMseqs2 clusters
(``plmscope.homology``) go to one side, so close homologues never sit on both.

1. **Normalisation.**  Each latent's activations are divided by its maximum over the proteins
   *outside the test split's clusters* (``normalising_max``), so no test protein, nor a homologue
   of one, sets the scale the thresholds are fractions of.
2. **Metric.**  A residue is *predicted* when its normalised activation exceeds a threshold in
   ``THRESHOLDS``.  Precision is per residue (predicted residues inside the concept / predicted
   residues).  Recall is per region (annotated regions with at least one predicted residue /
   regions) for *region-level* concepts and per residue (concept residues predicted / concept
   residues) for the *residue-level* concepts ``RESIDUE_LEVEL`` (single annotated residues).
   F1 = 2PR / (P + R).
3. **Threshold** per (latent, concept): the one with the highest validation F1 (ties: the lowest).
4. **Association**: validation F1 > ``ASSOCIATION_F1`` *and* test F1 (at the validation's
   threshold) > ``ASSOCIATION_F1``, for concepts with at least ``MIN_PER_SPLIT`` regions
   (residue-level concepts: residues) in *each* split.  Concepts with fewer are still scored (a
   description can then say "not enough evidence") but never associated.
5. **Interval**: a 95 % percentile-bootstrap interval of the test F1, resampling the test split's
   MMseqs2 clusters with replacement (``BOOTSTRAP_RESAMPLES``, seeded), for the reported pairs
   (``reported_pairs``: each latent's best by validation F1, plus every associated pair).
6. **Counts**, per SAE (one layer), as InterPLM reports them: associated (latent, concept) pairs,
   latents with at least one association, concepts with at least one associated latent.

Differences from InterPLM's published code (``interplm/concept``: compare_activations_to_concepts,
calculate_f1, report_final_metrics, prepare_concept_eval_set, ``interplm/sae/normalize.py``):

* *Test F1 at the validation's threshold.*  InterPLM's ``find_all_top_heldout_feats`` keeps the
  (feature, concept) pairs with validation F1 > 0.5 at any threshold and joins them to the test
  rows on (feature, concept) only, so its test F1 is the best over thresholds on the test set; here
  the threshold is fixed on validation and test F1 is read at it (stricter).
* *Normalising set.*  InterPLM scales each feature by its maximum over the proteins given to its
  normalise step (a random sample; its walkthrough uses the first annotated shard, which is also
  in the validation set); here: every atlas protein outside the test split's clusters.
* *Minimum evidence.*  InterPLM keeps concepts with more than 10 domains (its walkthrough: 25) *or*
  more than 1,500 residues (1,000) over validation and test together; here at least 10 regions
  (residue-level: residues) in each split separately.
* *Splits.*  InterPLM's validation and test are shards of a random protein sample; here they are
  MMseqs2 clusters hashed whole to one side.
* *Residue-level concepts.*  InterPLM's ``per_aa_concepts`` are active site, cofactor,
  glycosylation, modified residue and disulfide bond; plmscope has no cofactor concept and also
  counts cross-links residue by residue (stored, like disulfide bonds, as their two bonded residues).
* *Concept vocabulary.*  InterPLM uses UniProtKB feature sub-types (named domains, motifs, regions,
  without the catch-all "any" sub-concepts); plmscope uses whole feature types, Pfam families,
  NLS motifs and computed secondary structure.
* *Intervals.*  InterPLM reports no interval; the bootstrap interval is added here.
* *Ties.*  InterPLM breaks ties between thresholds by per-residue F1; here the lowest threshold wins.

The mixed residue/region metric is needed for every (threshold, latent, concept) triple at once, so
the confusion counts are sparse matrix products: ``B`` (residues x latents, activation above
threshold), ``C`` (residues x concepts), ``R`` (residues x regions) and ``G`` (regions x concepts):
TP residues = B'C, found regions = (B'R > 0) G.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
from scipy import sparse

from ..vocab import concept_key, is_point_pair

THRESHOLDS = (0.0, 0.15, 0.5, 0.6, 0.8)  # InterPLM's fractions of the latent's normalising maximum
ASSOCIATION_F1 = 0.5  # on validation and on test
MIN_PER_SPLIT = 10  # regions (residue-level concepts: residues) a concept needs in each split to be associated
BOOTSTRAP_RESAMPLES = 200  # resamples of the test split's clusters for the interval of test F1
CI_LEVEL = 0.95
# The pairs reported (stored, described, given an interval): each latent's best REPORTED_PER_LATENT
# concepts by validation F1 with validation F1 >= REPORTED_MIN_VAL_F1, plus every associated pair.
REPORTED_PER_LATENT = 5
REPORTED_MIN_VAL_F1 = 0.2
# Concepts whose annotations are single residues: recall and the minimum count go residue by
# residue (InterPLM's per_aa_concepts that plmscope has, plus cross-links; see the module docstring).
RESIDUE_LEVEL = frozenset({
    "feature:active site", "feature:glycosylation", "feature:modified residue", "feature:disulfide bond",
    "feature:cross-link",
})


def is_residue_level(concept: str) -> bool:
    return concept in RESIDUE_LEVEL


# Where each kind of annotation comes from, as the concept's source says it (computed secondary
# structure: its method, ``secondary.METHOD_DSSP`` or ``secondary.METHOD_CA``).
SOURCE_NAMES = {"pfam": "Pfam domains", "nls": "NLS motifs", "feature": "UniProt features"}


def concept_source(kind: str, label: str) -> str:
    """The source of one annotation row: 'UniProt features', 'Pfam domains', 'NLS motifs', 'DSSP', 'CA rule'."""
    if kind == "secondary_structure":
        return label
    return SOURCE_NAMES.get(kind, kind)


def inventory(regions, sources: dict[str, dict[str, int]], validation_of: dict[int, bool],
              result: ConceptResult | None, live: np.ndarray) -> list[dict]:
    """Per concept of the corpus: its sources (regions per source), proteins and regions in the
    corpus, and what the association saw: regions (residue-level concepts: residues) in each split
    of the concept proteins (``validation_of``: protein index -> True validation / False test),
    whether it was scored (present in both splits) and tested (>= ``MIN_PER_SPLIT`` in each), and
    its associated live latents."""
    proteins: dict[str, set] = defaultdict(set)
    n_regions: dict[str, int] = defaultdict(int)
    split = {True: defaultdict(int), False: defaultdict(int)}
    for i, c, s0, e0 in regions:
        proteins[c].add(i)
        n_regions[c] += 1
        side = validation_of.get(int(i))
        if side is not None:
            split[side][c] += (e0 - s0) if is_residue_level(c) else 1
    scored = {c: j for j, c in enumerate(result.concepts)} if result is not None else {}
    out = []
    for c in sorted(proteins):
        j = scored.get(c)
        n_assoc = 0
        if j is not None:
            n_assoc = int((result.associated[:, j] & np.asarray(live, bool)).sum())
        out.append({
            "concept": c, "level": "residue" if is_residue_level(c) else "region",
            "sources": dict(sorted(sources.get(c, {}).items())),
            "n_proteins": len(proteins[c]), "n_regions": n_regions[c],
            "n_val": int(result.n_val[j]) if j is not None else split[True][c],
            "n_test": int(result.n_test[j]) if j is not None else split[False][c],
            "scored": j is not None, "tested": bool(result.enough[j]) if j is not None else False,
            "n_associated_latents": n_assoc,
        })
    return out


def regions_from_annotations(rows, index: dict[str, int], lengths: Sequence[int]):
    """(protein_idx, concept, start0, end0_exclusive) tuples from annotation dicts.

    ``rows``: dicts with accession, kind, type, label, start, end (1-based inclusive).
    Regions are clipped to ``lengths`` (the residues the pLM saw).
    """
    out = []
    for row in rows:
        i = index.get(row["accession"])
        if i is None:
            continue
        key = concept_key(row["kind"], row["type"], row["label"])
        if key is None:
            continue
        start, end = int(row["start"]), int(row["end"])
        if is_point_pair(row["type"]) and end > start:
            spans = [(start, start), (end, end)]
        else:
            spans = [(start, end)]
        for s, e in spans:
            s0, e0 = max(s - 1, 0), min(e, lengths[i])
            if e0 > s0:
                out.append((i, key, s0, e0))
    return out


@dataclass
class ConceptMasks:
    concepts: list[str]
    C: sparse.csr_matrix  # residues x concepts (0/1)
    R: sparse.csr_matrix  # residues x regions (0/1)
    G: sparse.csr_matrix  # regions x concepts (0/1)
    n_regions: np.ndarray  # per concept
    n_residues: np.ndarray  # per concept: residues inside it (overlapping regions count once)
    residue_level: np.ndarray  # bool per concept
    region_protein: np.ndarray  # per region: its protein

    @property
    def n_units(self) -> np.ndarray:
        """Per concept, what its recall and minimum count are over: residues or regions."""
        return np.where(self.residue_level, self.n_residues, self.n_regions).astype(np.int64)


def build_masks(regions, offsets: np.ndarray, n_residues: int, concepts: Sequence[str]) -> ConceptMasks:
    """Sparse masks for ``regions`` (protein_idx, concept, start0, end0) on concatenated residues."""
    cidx = {c: j for j, c in enumerate(concepts)}
    regions = [r for r in regions if r[1] in cidx]
    res_rows, reg_cols, reg_concept = [], [], []
    for k, (i, key, s0, e0) in enumerate(regions):
        pos = np.arange(offsets[i] + s0, offsets[i] + e0)
        res_rows.append(pos)
        reg_cols.append(np.full(len(pos), k))
        reg_concept.append(cidx[key])
    n_reg = len(regions)
    rr = np.concatenate(res_rows) if res_rows else np.zeros(0, dtype=np.int64)
    rc = np.concatenate(reg_cols) if reg_cols else np.zeros(0, dtype=np.int64)
    R = sparse.csr_matrix((np.ones(len(rr), np.float32), (rr, rc)), shape=(n_residues, n_reg))
    G = sparse.csr_matrix(
        (np.ones(n_reg, np.float32), (np.arange(n_reg), np.asarray(reg_concept, dtype=np.int64))),
        shape=(n_reg, len(concepts)),
    )
    C = (R @ G).astype(bool).astype(np.float32).tocsr()  # overlapping regions of one concept count once
    return ConceptMasks(
        concepts=list(concepts), C=C, R=R, G=G,
        n_regions=np.asarray(G.sum(axis=0)).ravel(), n_residues=np.asarray(C.sum(axis=0)).ravel(),
        residue_level=np.array([is_residue_level(c) for c in concepts], dtype=bool),
        region_protein=np.array([r[0] for r in regions], dtype=np.int64),
    )


def _f1(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    denom = precision + recall
    return np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)


def concept_scores(acts: sparse.csr_matrix, masks: ConceptMasks, thresholds: Sequence[float] = THRESHOLDS):
    """precision, recall, f1 arrays of shape (n_thresholds, n_latents, n_concepts), float32.

    ``acts``: residues x latents, activations already divided by each latent's normalising maximum.
    Recall is per region, or per residue for residue-level concepts.
    """
    n_lat, n_con = acts.shape[1], len(masks.concepts)
    shape = (len(thresholds), n_lat, n_con)
    precision = np.zeros(shape, np.float32)
    recall = np.zeros(shape, np.float32)
    Ct, Rt = masks.C.tocsc(), masks.R.tocsc()
    units = masks.n_units[None, :].astype(np.float32)
    for t, thr in enumerate(thresholds):
        B = (acts > thr).astype(np.float32).tocsc()
        n_pred = np.asarray(B.sum(axis=0)).ravel()
        tp = (B.T @ Ct).toarray()
        found = ((B.T @ Rt) > 0).astype(np.float32) @ masks.G
        found = found.toarray() if sparse.issparse(found) else np.asarray(found)
        found = np.where(masks.residue_level[None, :], tp, found)  # residue-level: residues found
        np.divide(tp, n_pred[:, None], out=precision[t], where=n_pred[:, None] > 0)
        np.divide(found, units, out=recall[t], where=units > 0)
    return precision, recall, _f1(precision, recall)


def split_validation(groups: np.ndarray, names: Sequence[str], seed: int = 0) -> np.ndarray:
    """True = validation, False = test; whole groups go to one side (seeded hash of the group's
    first name, so the split does not depend on row order)."""
    first: dict[int, str] = {}
    for g, name in zip(groups, names):
        if g not in first or name < first[g]:
            first[g] = name
    side = {g: hashlib.sha256(f"{seed}:{n}".encode()).digest()[0] & 1 == 0 for g, n in first.items()}
    return np.array([side[g] for g in groups], dtype=bool)


def normalising_max(protein_max: sparse.spmatrix, groups: Sequence, test_groups: Sequence) -> np.ndarray:
    """Per latent, the maximum activation over the proteins whose homology group is not a test group.

    ``protein_max``: proteins x latents maxima (the atlas's ``protein_latent_stats``, every protein);
    ``groups``: per protein, its MMseqs2 cluster; ``test_groups``: the clusters of the test split.
    Excluding whole clusters keeps a test protein's homologues outside the concept subset from
    setting the scale too.  0 for a latent active only there (it then predicts nothing).
    """
    keep = np.flatnonzero(~np.isin(np.asarray(groups, dtype=object), np.asarray(list(test_groups), dtype=object)))
    if len(keep) == 0:
        return np.zeros(protein_max.shape[1], np.float32)
    return np.asarray(sparse.csr_matrix(protein_max)[keep].max(axis=0).toarray()).ravel().astype(np.float32)


@dataclass
class ConceptResult:
    """Per (latent, concept) arrays of shape (latents, concepts); per concept arrays of (concepts,)."""

    concepts: list[str]
    residue_level: np.ndarray  # bool per concept
    scale: np.ndarray  # per latent: the normalising maximum (over proteins outside the test clusters)
    threshold: np.ndarray  # chosen fraction of ``scale``, on validation
    val_precision: np.ndarray
    val_recall: np.ndarray
    val_f1: np.ndarray
    test_precision: np.ndarray  # at the validation's threshold
    test_recall: np.ndarray
    test_f1: np.ndarray
    test_f1_lo: np.ndarray  # bootstrap interval of test F1; NaN outside ``reported``
    test_f1_hi: np.ndarray
    associated: np.ndarray  # bool: InterPLM's rule
    reported: np.ndarray  # bool: the pairs stored and described (``reported_pairs``)
    n_val: np.ndarray  # per concept: regions (residue-level: residues) in validation
    n_test: np.ndarray
    enough: np.ndarray  # bool per concept: >= min_per_split in each split
    n_test_clusters: int = 0
    n_boot: int = 0


def combine(a: ConceptResult, b: ConceptResult) -> ConceptResult:
    """``a``'s concepts then ``b``'s (the same latents, scored on different protein sets)."""
    out = {}
    for f in fields(ConceptResult):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "concepts":
            out[f.name] = list(x) + list(y)
        elif f.name == "scale":
            out[f.name] = x
        elif f.name in ("n_test_clusters", "n_boot"):
            out[f.name] = max(x, y)
        else:
            out[f.name] = np.concatenate([x, y], axis=x.ndim - 1)
    return ConceptResult(**out)


def reported_pairs(val_f1: np.ndarray, associated: np.ndarray, *, per_latent: int = REPORTED_PER_LATENT,
                   min_val_f1: float = REPORTED_MIN_VAL_F1) -> np.ndarray:
    """Each latent's best ``per_latent`` concepts by *validation* F1 (never test F1) with validation
    F1 >= ``min_val_f1``, plus every associated pair."""
    if val_f1.size == 0:
        return np.zeros(val_f1.shape, bool)
    order = np.argsort(-val_f1, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :], axis=1)
    return ((rank < per_latent) & (val_f1 >= min_val_f1)) | associated


def associate(
    acts: sparse.csr_matrix,
    offsets: np.ndarray,
    lengths: Sequence[int],
    regions,
    validation: np.ndarray,
    *,
    scale: np.ndarray,
    groups: Sequence | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    min_per_split: int = MIN_PER_SPLIT,
    n_boot: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> ConceptResult:
    """InterPLM's rule: threshold chosen on validation proteins, F1 on validation and test.

    ``acts``: residues x latents, raw activations, proteins concatenated at ``offsets``;
    ``validation``: bool per protein; ``scale``: per latent, the normalising maximum
    (``normalising_max``); ``groups``: per protein, its homology cluster, the unit the bootstrap
    resamples (default: each protein alone).  Concepts with at least one region in each split are
    scored; only those with ``min_per_split`` can be associated.
    """
    lengths = np.asarray(lengths)
    scale = np.asarray(scale, dtype=np.float64)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    acts = sparse.csr_matrix(acts @ sparse.diags(inv.astype(np.float32)))
    protein_of_residue = np.repeat(np.arange(len(lengths)), lengths)
    sides = {}
    for name, side in (("val", validation), ("test", ~validation)):
        prot = np.flatnonzero(side)
        res_rows = np.flatnonzero(side[protein_of_residue])
        sub_offsets = np.zeros(len(lengths), dtype=np.int64)
        sub_offsets[prot] = np.concatenate([[0], np.cumsum(lengths[prot])[:-1]]) if len(prot) else []
        sides[name] = (acts[res_rows], sub_offsets, len(res_rows), [r for r in regions if side[r[0]]])
    present = [{r[1] for r in sides[name][3]} for name in ("val", "test")]
    concepts = sorted(present[0] & present[1])
    masks, scores = {}, {}
    for name, (a, off, n_res, regs) in sides.items():
        masks[name] = build_masks(regs, off, n_res, concepts)
        scores[name] = concept_scores(a, masks[name], thresholds)
    best = scores["val"][2].argmax(axis=0)  # (latents, concepts): chosen on validation only (ties: lowest)
    take = lambda arr: np.take_along_axis(arr, best[None], axis=0)[0]  # noqa: E731
    (vp, vr, vf), (tp, tr, tf) = (tuple(take(x) for x in scores[n]) for n in ("val", "test"))
    n_val, n_test = masks["val"].n_units, masks["test"].n_units
    enough = (n_val >= min_per_split) & (n_test >= min_per_split)
    associated = (vf > ASSOCIATION_F1) & (tf > ASSOCIATION_F1) & enough[None, :]
    reported = reported_pairs(vf, associated)
    lo = np.full(vf.shape, np.nan)
    hi = np.full(vf.shape, np.nan)
    test_groups = np.asarray(groups if groups is not None else np.arange(len(lengths)), dtype=object)[~validation]
    _, cluster = np.unique(test_groups.astype(str), return_inverse=True)
    n_clusters = int(cluster.max()) + 1 if len(cluster) else 0
    li, ci = np.nonzero(reported)
    if len(li) and n_clusters and n_boot > 0:
        a, off, n_res, _ = sides["test"]
        test_local = np.cumsum(~validation) - 1  # global protein index -> index among test proteins
        residue_cluster = np.repeat(cluster, lengths[~validation])
        region_cluster = cluster[test_local[masks["test"].region_protein]]
        lo[li, ci], hi[li, ci] = bootstrap_f1(
            a, masks["test"], residue_cluster, region_cluster, n_clusters, np.asarray(thresholds)[best[li, ci]],
            li, ci, n_boot=n_boot, seed=seed)
    return ConceptResult(
        concepts=concepts, residue_level=masks["val"].residue_level, scale=scale.astype(np.float32),
        threshold=np.asarray(thresholds, np.float32)[best],
        val_precision=vp, val_recall=vr, val_f1=vf, test_precision=tp, test_recall=tr, test_f1=tf,
        test_f1_lo=lo, test_f1_hi=hi, associated=associated, reported=reported,
        n_val=n_val, n_test=n_test, enough=enough, n_test_clusters=n_clusters, n_boot=n_boot,
    )


def bootstrap_f1(acts: sparse.csr_matrix, masks: ConceptMasks, residue_cluster: np.ndarray, region_cluster: np.ndarray,
                 n_clusters: int, pair_threshold: np.ndarray, pair_latent: np.ndarray, pair_concept: np.ndarray,
                 *, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = CI_LEVEL):
    """Percentile-bootstrap interval (lo, hi) of F1 for each (latent, concept) pair at its threshold.

    The clusters (``residue_cluster`` / ``region_cluster``: the cluster of each residue / region of
    ``acts`` / ``masks``) are resampled with replacement.  The confusion counts are additive over
    clusters, so they are computed once per cluster (clusters x pairs) and every resample is one
    weighted sum: ``W @ counts`` with W (resamples x clusters) the multinomial draw counts.
    """
    n_pairs = len(pair_latent)
    counts = {k: np.zeros((n_clusters, n_pairs), np.float64) for k in ("tp", "pred", "found", "units")}
    Q = sparse.csr_matrix((np.ones(len(residue_cluster), np.float32), (residue_cluster, np.arange(len(residue_cluster)))),
                          shape=(n_clusters, len(residue_cluster)))
    Qr = sparse.csr_matrix((np.ones(len(region_cluster), np.float32), (region_cluster, np.arange(len(region_cluster)))),
                           shape=(n_clusters, len(region_cluster)))
    units = np.where(masks.residue_level[None, :], (Q @ masks.C).toarray(), (Qr @ masks.G).toarray())
    counts["units"][:] = units[:, pair_concept]
    Cc, Gc, Rr = masks.C.tocsc(), masks.G.tocsc(), masks.R.tocsr()
    for thr in np.unique(pair_threshold):
        at = pair_threshold == thr
        B = (acts > thr).astype(np.float32).tocsr()
        counts["pred"][:, at] = (Q @ B).toarray()[:, pair_latent[at]]
        for c in np.unique(pair_concept[at]):
            idx = np.flatnonzero(at & (pair_concept == c))
            rows = Cc[:, c].indices  # the concept's residues
            Bc = B[rows][:, pair_latent[idx]]
            Qc = sparse.csr_matrix((np.ones(len(rows), np.float32), (residue_cluster[rows], np.arange(len(rows)))),
                                   shape=(n_clusters, len(rows)))
            counts["tp"][:, idx] = (Qc @ Bc).toarray()
            if masks.residue_level[c]:
                counts["found"][:, idx] = counts["tp"][:, idx]
            else:
                regs = Gc[:, c].indices
                hit = ((Rr[rows][:, regs].T @ Bc) > 0).astype(np.float32)  # regions x pairs: found at all
                counts["found"][:, idx] = (Qr[:, regs] @ hit).toarray()
    rng = np.random.default_rng(seed)
    W = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_boot).astype(np.float64)
    tp, pred, found, unit = (W @ counts[k] for k in ("tp", "pred", "found", "units"))
    precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
    recall = np.divide(found, unit, out=np.zeros_like(found), where=unit > 0)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(_f1(precision, recall), [alpha, 1.0 - alpha], axis=0)
    return lo, hi


def summarize(result: ConceptResult, live: np.ndarray) -> dict:
    """Counts as InterPLM reports them, per SAE (one layer): associated pairs, latents, concepts."""
    live = np.asarray(live, bool)[:, None]
    assoc = result.associated & live
    passed_val = (result.val_f1 > ASSOCIATION_F1) & result.enough[None, :] & live
    return {
        "n_associated_pairs": int(assoc.sum()),
        "n_associated_latents": int(assoc.any(axis=1).sum()),
        "n_associated_concepts": int(assoc.any(axis=0).sum()),
        "n_pairs_passing_validation": int(passed_val.sum()),  # of which the test F1 confirmed n_associated_pairs
        "n_concepts_scored": len(result.concepts),
        "n_concepts_tested": int(result.enough.sum()),
        "residue_level_concepts": [c for c, r in zip(result.concepts, result.residue_level) if r],
        "thresholds": list(THRESHOLDS),
        "min_per_split": MIN_PER_SPLIT,
        "association_rule": (f"validation F1 > {ASSOCIATION_F1} and test F1 > {ASSOCIATION_F1} at the threshold chosen on "
                             f"validation; >= {MIN_PER_SPLIT} regions (residue-level concepts: residues) in each split"),
        "bootstrap": {"resamples": result.n_boot, "level": CI_LEVEL, "unit": "MMseqs2 cluster of the test split",
                      "n_test_clusters": result.n_test_clusters},
    }
