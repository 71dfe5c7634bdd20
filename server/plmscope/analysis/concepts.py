"""Concept associations, as InterPLM (Simon & Zou 2024): latent x per-residue concept F1.

Concepts are annotated regions of the atlas proteins: each Pfam family (``pfam:PF00069``), each
UniProt feature type (``feature:signal peptide``, ``feature:transmembrane region``, ...; bookkeeping
types such as chain / variant / conflict are left out), NLS motifs, and secondary structure (UniProt
HELIX/STRAND/TURN features, or computed from atlas structures by ``secondary.py``).  The names and
``concept_key`` live in ``plmscope.vocab``.

For a latent, a residue is *predicted* when its activation / the latent's corpus maximum exceeds a
threshold in ``THRESHOLDS`` (0 = any activation).  For a concept:

* precision is per residue: predicted residues inside the concept / predicted residues;
* recall is per region: annotated regions with at least one predicted residue / regions;
* F1 = 2PR / (P + R).

The threshold is chosen per (latent, concept) on the validation proteins; precision, recall and F1
are reported on the test proteins at that threshold.  A pair is *associated* when test F1 >
``ASSOCIATION_F1``.  Proteins are split by homology: whole MMseqs2 clusters (``plmscope.homology``)
go to one side, so close homologues cannot sit on both sides.

The mixed residue/region metric is not a library function and it is needed for every (threshold,
latent, concept) triple at once, so the confusion counts are computed with sparse matrix products:
``B`` (residues x latents, activation above threshold), ``C`` (residues x concepts), ``R``
(residues x regions) and ``G`` (regions x concepts): TP residues = B'C, found regions = (B'R > 0) G.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import sparse

from ..vocab import concept_key, is_point_pair

THRESHOLDS = (0.0, 0.15, 0.5, 0.6, 0.8)  # InterPLM's fractions of the latent max
ASSOCIATION_F1 = 0.5
MIN_REGIONS_PER_SPLIT = 2  # a concept needs regions on both sides to be chosen and tested


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
    n_regions = np.asarray(G.sum(axis=0)).ravel()
    return ConceptMasks(list(concepts), C, R, G, n_regions)


def concept_scores(acts: sparse.csr_matrix, masks: ConceptMasks, thresholds: Sequence[float] = THRESHOLDS):
    """precision, recall, f1 arrays of shape (n_thresholds, n_latents, n_concepts), float32.

    ``acts``: residues x latents, activations already divided by each latent's corpus maximum.
    """
    n_lat, n_con = acts.shape[1], len(masks.concepts)
    shape = (len(thresholds), n_lat, n_con)
    precision = np.zeros(shape, np.float32)
    recall = np.zeros(shape, np.float32)
    Ct, Rt = masks.C.tocsc(), masks.R.tocsc()
    for t, thr in enumerate(thresholds):
        B = (acts > thr).astype(np.float32).tocsc()
        n_pred = np.asarray(B.sum(axis=0)).ravel()
        tp = (B.T @ Ct).toarray()
        found = ((B.T @ Rt) > 0).astype(np.float32) @ masks.G
        found = found.toarray() if sparse.issparse(found) else np.asarray(found)
        np.divide(tp, n_pred[:, None], out=precision[t], where=n_pred[:, None] > 0)
        np.divide(found, masks.n_regions[None, :], out=recall[t], where=masks.n_regions[None, :] > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return precision, recall, f1


def split_validation(groups: np.ndarray, names: Sequence[str], seed: int = 0) -> np.ndarray:
    """True = validation, False = test; whole groups go to one side (seeded hash of the group's
    first name, so the split does not depend on row order)."""
    first: dict[int, str] = {}
    for g, name in zip(groups, names):
        if g not in first or name < first[g]:
            first[g] = name
    side = {g: hashlib.sha256(f"{seed}:{n}".encode()).digest()[0] & 1 == 0 for g, n in first.items()}
    return np.array([side[g] for g in groups], dtype=bool)


@dataclass
class ConceptResult:
    concepts: list[str]
    threshold: np.ndarray  # (latents, concepts) chosen fraction
    val_f1: np.ndarray
    test_f1: np.ndarray
    test_precision: np.ndarray
    test_recall: np.ndarray
    associated: np.ndarray  # bool (latents, concepts)
    n_val_regions: np.ndarray
    n_test_regions: np.ndarray


def associate(
    acts: sparse.csr_matrix,
    offsets: np.ndarray,
    lengths: Sequence[int],
    regions,
    validation: np.ndarray,
    *,
    thresholds: Sequence[float] = THRESHOLDS,
    min_regions: int = MIN_REGIONS_PER_SPLIT,
) -> ConceptResult:
    """Threshold chosen on validation proteins, F1 reported on test proteins.

    ``acts``: residues x latents (normalised), proteins concatenated at ``offsets``;
    ``validation``: bool per protein.
    """
    lengths = np.asarray(lengths)
    protein_of_residue = np.repeat(np.arange(len(lengths)), lengths)
    out = {}
    counts = {}
    for name, side in (("val", validation), ("test", ~validation)):
        prot = np.flatnonzero(side)
        res_mask = side[protein_of_residue]
        sub_offsets = np.zeros(len(lengths), dtype=np.int64)
        sub_offsets[prot] = np.concatenate([[0], np.cumsum(lengths[prot])[:-1]]) if len(prot) else []
        sub_regions = [r for r in regions if side[r[0]]]
        counts[name] = sub_regions
        out[name] = (acts[np.flatnonzero(res_mask)], sub_offsets, int(res_mask.sum()))
    concepts = sorted({r[1] for r in regions})
    per_split = {}
    for name in ("val", "test"):
        n = {c: 0 for c in concepts}
        for r in counts[name]:
            n[r[1]] += 1
        per_split[name] = n
    concepts = [c for c in concepts if min(per_split["val"][c], per_split["test"][c]) >= min_regions]
    results = {}
    for name in ("val", "test"):
        a, off, n_res = out[name]
        masks = build_masks(counts[name], off, n_res, concepts)
        results[name] = concept_scores(a, masks, thresholds)
    _, _, val_f1 = results["val"]
    best = val_f1.argmax(axis=0)  # (latents, concepts): chosen on validation only
    take = lambda arr: np.take_along_axis(arr, best[None], axis=0)[0]  # noqa: E731
    tp, tr, tf = results["test"]
    test_f1 = take(tf)
    return ConceptResult(
        concepts=concepts,
        threshold=np.asarray(thresholds, np.float32)[best],
        val_f1=take(val_f1),
        test_f1=test_f1,
        test_precision=take(tp),
        test_recall=take(tr),
        associated=test_f1 > ASSOCIATION_F1,
        n_val_regions=np.array([per_split["val"][c] for c in concepts]),
        n_test_regions=np.array([per_split["test"][c] for c in concepts]),
    )


def summarize(result: ConceptResult, live: np.ndarray) -> dict:
    assoc = result.associated & np.asarray(live, bool)[:, None]
    return {
        "n_concepts_tested": len(result.concepts),
        "n_associated_latents": int(assoc.any(axis=1).sum()),
        "n_concepts_covered": int(assoc.any(axis=0).sum()),
        "n_associated_pairs": int(assoc.sum()),
        "thresholds": list(THRESHOLDS),
        "association_rule": f"test F1 > {ASSOCIATION_F1}",
    }
