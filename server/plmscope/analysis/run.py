"""Interpret an atlas: family specificity, activation patterns, concept associations, linear
probes and automatic descriptions, stored in the atlas's analysis tables.

The atlas is copied to a temporary file next to it, the analysis is written there and the copy
replaces the atlas with os.replace: an interrupted run leaves the atlas as it was.  Re-running
replaces the previous analysis of the analysed SAEs.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy import sparse

from ..errors import AtlasError, InputError
from ..store import analysis_sql as asql
from . import concepts, describe, family, patterns, probes, secondary

log = logging.getLogger(__name__)

TOP_EXAMPLES = 10  # top examples per latent that vote on the pattern
CONCEPT_ROWS_PER_LATENT = 5  # latent_concepts keeps each latent's best pairs by validation F1 ...
MIN_STORED_VAL_F1 = 0.2  # ... above this, plus every associated pair


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atlas", required=True, help="atlas file (DuckDB) to analyse in place (published atomically)")
    p.add_argument("--sae", action="append", help="SAE id to analyse (repeatable; default: all)")
    p.add_argument("--max-proteins", type=int, default=1000,
                   help="annotated proteins whose per-residue activations are recomputed for concepts (default 1000; 0 skips concepts)")
    p.add_argument("--seed", type=int, default=0, help="seed of every split and probe (default 0)")
    p.add_argument("--device", default="auto", help="device for the pLM + SAE recomputation: auto, cpu, cuda")
    p.add_argument("--token-budget", type=int, default=8192, help="residues per pLM batch (default 8192)")


def run(args: argparse.Namespace) -> int:
    path = Path(args.atlas)
    if not path.is_file():
        raise AtlasError(f"atlas file {path} does not exist (build one with `plmscope build`)")
    t0 = time.perf_counter()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".analyze.tmp", dir=path.parent)
    os.close(fd)
    try:
        shutil.copyfile(path, tmp)
        summaries = analyze_file(tmp, str(path), args)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for s in summaries:
        print(format_summary(s))
    print(f"analyze: {len(summaries)} SAE(s) in {time.perf_counter() - t0:.1f} s -> {path}")
    return 0


def analyze_file(tmp: str, display: str, args) -> list[dict]:
    con = asql.open_for_writing(tmp, display)
    try:
        asql.check_atlas(con, display)
        sae_rows = asql.saes(con)
        wanted = set(args.sae or [s["sae_id"] for s in sae_rows])
        unknown = wanted - {s["sae_id"] for s in sae_rows}
        if unknown:
            raise InputError(f"{display} has no SAE {', '.join(sorted(unknown))} (it has: {', '.join(s['sae_id'] for s in sae_rows)})")
        corpus = Corpus.load(con)
        plms: dict[str, object] = {}
        out = []
        for sae in sae_rows:
            if sae["sae_id"] in wanted:
                out.append(analyze_sae(con, sae, corpus, plms, args))
        asql.checkpoint(con)
        return out
    finally:
        con.close()


class Corpus:
    """Proteins, their annotations as concept regions, and computed secondary structure."""

    def __init__(self, prots, annotation_rows, ss_rows, fam_names):
        self.accessions = np.array([p["accession"] for p in prots], dtype=object)
        self.index = {a: i for i, a in enumerate(self.accessions)}
        self.lengths = np.array([p["truncated_to"] or p["length"] for p in prots], dtype=np.int64)
        self.sequences = [p["sequence"] for p in prots]
        self.families = [p["families"] or [] for p in prots]
        self.locations = [p["locations"] or [] for p in prots]
        self.family_names = fam_names
        self.regions = concepts.regions_from_annotations(annotation_rows + ss_rows, self.index, self.lengths)

    @classmethod
    def load(cls, con) -> "Corpus":
        prots = asql.proteins(con)
        rows = asql.annotations(con)
        has_ss = {r["accession"] for r in rows
                  if (concepts.concept_key(r["kind"], r["type"], r["label"]) or "").startswith("secondary structure")}
        ss_rows = []
        for st in asql.structures_for_secondary(con):
            if st["accession"] in has_ss:
                continue  # annotated secondary structure wins over the CA rule
            try:
                segs = secondary.segments(st["content"], st["residue_map"])
            except (RuntimeError, ValueError) as exc:
                log.warning("secondary structure of %s skipped: %s", st["structure_id"], exc)
                continue
            ss_rows += [{"accession": st["accession"], "kind": "secondary_structure", "type": name, "label": "CA rule",
                         "start": s, "end": e} for name, s, e in segs]
        return cls(prots, rows, ss_rows, asql.family_names(con))


def _protein_matrices(con, sid: str, corpus: Corpus, d: int):
    stats = asql.protein_latent_stats(con, sid)
    n = len(corpus.accessions)
    rows = np.searchsorted(corpus.accessions, stats["accession"])  # accessions are sorted
    cols = stats["latent"].astype(np.int64)
    pm = sparse.csr_matrix((stats["max_act"].astype(np.float32), (rows, cols)), shape=(n, d))
    ps = sparse.csr_matrix((stats["sum_act"].astype(np.float32), (rows, cols)), shape=(n, d))
    return pm, ps


def _residue_activations(sae_cfg, weights, plm, layer, seqs, ids, latent_max, token_budget):
    """Residues x latents (normalised by the corpus max), proteins concatenated in ``ids`` order."""
    from ..sae.io import sae_from_bytes

    sae = sae_from_bytes(sae_cfg, weights).to(plm.device)
    inv = torch.tensor(np.divide(1.0, latent_max, out=np.zeros_like(latent_max), where=latent_max > 0), device=plm.device)
    blocks: dict[str, sparse.csr_matrix] = {}
    with torch.no_grad():
        for rid, _, rep in plm.iter_representations(zip(ids, seqs), layer, token_budget=token_budget):
            z = sae.encode(rep.to(plm.device)) * inv
            blocks[rid] = sparse.csr_matrix(z.float().cpu().numpy())
    return sparse.vstack([blocks[i] for i in ids], format="csr")


def _pick_concept_proteins(corpus: Corpus, limit: int, seed: int) -> np.ndarray:
    annotated = np.unique([r[0] for r in corpus.regions])
    if len(annotated) <= limit:
        return annotated
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(annotated, size=limit, replace=False))


def analyze_sae(con, sae: dict, corpus: Corpus, plms: dict, args) -> dict:
    sid, d = sae["sae_id"], sae["d_sae"]
    times: dict[str, float] = {}
    t = time.perf_counter()
    asql.clear_analysis(con, sid)  # first: the steps below write as they go (re-running replaces)
    lat = asql.latents(con, sid, d)
    live = ~lat["is_dead"] & (lat["max_act"] > 0)
    pm, ps = _protein_matrices(con, sid, corpus, d)
    summary: dict = {"sae_id": sid, "plm": sae["plm"], "layer": sae["layer"], "d_sae": d, "seed": args.seed}

    # 1. family specificity (split by sequence hash: duplicates share a half)
    fres = family.family_specificity(pm, lat["max_act"], corpus.families, corpus.sequences, seed=args.seed)
    summary["family"] = family.summarize(fres, live)
    times["family"] = time.perf_counter() - t

    # 2. activation patterns from top examples
    t = time.perf_counter()
    examples: dict[int, list[np.ndarray]] = defaultdict(list)
    for latent, blob in asql.top_examples(con, sid, TOP_EXAMPLES):
        examples[latent].append(np.frombuffer(blob, dtype=np.uint8).astype(np.float32))
    pattern = [patterns.classify_latent(examples.get(j, []), is_dead=not live[j])[0] for j in range(d)]
    counts = {p: 0 for p in patterns.PATTERNS}
    for p in pattern:
        counts[p] += 1
    summary["patterns"] = counts
    times["patterns"] = time.perf_counter() - t

    # 3. concept associations on recomputed per-residue activations
    t = time.perf_counter()
    cres = None
    chosen = _pick_concept_proteins(corpus, args.max_proteins, args.seed) if args.max_proteins > 0 else np.array([], int)
    if len(chosen) == 0:
        summary["concepts"] = {"skipped": "no annotated proteins (or --max-proteins 0)"}
    else:
        if sae["plm"] not in plms:
            from ..plm import load_plm

            plms[sae["plm"]] = load_plm(sae["plm"], device=args.device)
        plm = plms[sae["plm"]]
        cfg, weights = asql.sae_weights(con, sid)
        ids = [str(corpus.accessions[i]) for i in chosen]
        seqs = [corpus.sequences[i][: corpus.lengths[i]] for i in chosen]
        acts = _residue_activations(cfg, weights, plm, sae["layer"], seqs, ids, lat["max_act"], args.token_budget)
        sub = {int(p): k for k, p in enumerate(chosen)}
        lengths = corpus.lengths[chosen]
        regions = [(sub[i], c, s, e) for i, c, s, e in corpus.regions if i in sub]
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        groups = concepts.similarity_groups(seqs)
        validation = concepts.split_validation(groups, ids, seed=args.seed)
        cres = concepts.associate(acts, offsets, lengths, regions, validation)
        summary["concepts"] = {
            **concepts.summarize(cres, live),
            "n_proteins": len(chosen), "n_validation": int(validation.sum()), "n_test": int((~validation).sum()),
            "n_similarity_groups": int(len(np.unique(groups))),
            "split": f"proteins sharing >= {concepts.KMER_MIN_SHARED:.0%} of their {concepts.KMER}-mers grouped; groups hashed to validation/test",
        }
    times["concepts"] = time.perf_counter() - t

    # 4. probes
    t = time.perf_counter()
    summary["probes"] = _probes(con, sid, corpus, pm, ps, d, args.seed)
    times["probes"] = time.perf_counter() - t

    # 5. descriptions + writes
    t = time.perf_counter()
    best_concept, best_cf1 = [None] * d, np.full(d, np.nan)
    if cres is not None and len(cres.concepts):
        masked = np.where(cres.associated, cres.test_f1, -1.0)
        j = masked.argmax(axis=1)
        for i in np.flatnonzero(masked.max(axis=1) > 0):
            best_concept[i], best_cf1[i] = cres.concepts[j[i]], float(cres.test_f1[i, j[i]])
    bg = asql.aa_background(con, sid)
    from ..store.schema import AMINO_ACIDS

    descriptions = [
        describe.describe(
            pattern=pattern[i], concept=best_concept[i], concept_f1=best_cf1[i],
            family=fres.family[i], family_name=corpus.family_names.get(fres.family[i] or "", ""),
            family_f1=fres.f1[i], family_precision=fres.precision[i], family_specific=bool(fres.specific[i]),
            enriched=describe.aa_enrichment(lat["aa_counts"][i], bg, AMINO_ACIDS),
        ) if live[i] else describe.describe(pattern="dead")
        for i in range(d)
    ]
    asql.write_latent_analysis(con, sid, {
        "latent": np.arange(d, dtype=np.int32), "pattern": np.array(pattern, dtype=object),
        "family": np.array(fres.family, dtype=object), "family_threshold": fres.fraction.astype(np.float32),
        "family_precision": fres.precision, "family_recall": fres.recall, "family_f1": fres.f1, "family_auc": fres.auc,
        "family_specific": fres.specific, "concept": np.array(best_concept, dtype=object), "concept_f1": best_cf1,
        "description": np.array(descriptions, dtype=object),
    })
    if cres is not None and len(cres.concepts):
        asql.write_latent_concepts(con, sid, _concept_rows(cres, live))
    summary["timing_s"] = {k: round(v, 2) for k, v in times.items()}
    summary["timing_s"]["write"] = round(time.perf_counter() - t, 2)
    asql.write_summary(con, sid, summary)
    return summary


def _concept_rows(cres, live) -> dict[str, np.ndarray]:
    # Keep each latent's best pairs by *validation* F1 (never by test F1) plus all associated pairs.
    order = np.argsort(-cres.val_f1, axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :], axis=1)
    keep = ((rank < CONCEPT_ROWS_PER_LATENT) & (cres.val_f1 >= MIN_STORED_VAL_F1)) | cres.associated
    keep &= np.asarray(live, bool)[:, None]
    li, ci = np.nonzero(keep)
    return {
        "latent": li.astype(np.int32), "concept": np.array(cres.concepts, dtype=object)[ci],
        "threshold": cres.threshold[li, ci].astype(np.float32), "val_f1": cres.val_f1[li, ci].astype(np.float64),
        "test_f1": cres.test_f1[li, ci].astype(np.float64), "test_precision": cres.test_precision[li, ci].astype(np.float64),
        "test_recall": cres.test_recall[li, ci].astype(np.float64), "associated": cres.associated[li, ci],
    }


def _probes(con, sid, corpus: Corpus, pm, ps, d, seed) -> dict:
    try:
        rows, y = probes.single_label(corpus.locations)
    except probes.ProbeSkipped as exc:
        log.warning("probes skipped: %s", exc)
        return {"skipped": str(exc)}
    emb_acc, emb = asql.embeddings(con, sid)
    have = set(emb_acc)
    if emb is not None:
        keep = np.array([corpus.accessions[i] in have for i in rows])
        rows, y = rows[keep], y[keep]
    try:
        train, test = probes.split(y, [corpus.sequences[i] for i in rows], seed=seed)
    except probes.ProbeSkipped as exc:
        return {"skipped": str(exc)}
    out = {"task": "location", "labels": "single-location proteins, multiclass", "n_classes": len(set(y))}
    X = probes.sae_features(pm, ps, corpus.lengths)[rows]
    res = probes.fit_probe(X, y, train, test, task="location", features="sae_mean_max", seed=seed)
    asql.write_probe(con, sid, res.__dict__, probes.top_latents(res, d))
    out["sae_mean_max"] = {"accuracy": res.accuracy, "macro_f1": res.macro_f1, "n_train": res.n_train, "n_test": res.n_test}
    if emb is None:
        out["raw_mean"] = {"skipped": "the atlas has no protein_embeddings for this SAE"}
    else:
        pos = {a: i for i, a in enumerate(emb_acc)}
        Xr = emb[[pos[corpus.accessions[i]] for i in rows]]
        raw = probes.fit_probe(Xr, y, train, test, task="location", features="raw_mean", seed=seed)
        asql.write_probe(con, sid, raw.__dict__, [])
        out["raw_mean"] = {"accuracy": raw.accuracy, "macro_f1": raw.macro_f1, "n_train": raw.n_train, "n_test": raw.n_test}
    return out


def format_summary(s: dict) -> str:
    f, p, c, pr = s["family"], s["patterns"], s.get("concepts", {}), s.get("probes", {})
    lines = [f"{s['sae_id']} (layer {s['layer']}, {s['d_sae']} latents, {f['n_live']} live)"]
    lines.append(f"  family: {f['n_family_specific']} family-specific, {f['n_general']} general, {f['n_rare']} rare "
                 f"({f['n_families_with_specific_latent']} families)")
    lines.append("  patterns: " + ", ".join(f"{k} {v}" for k, v in p.items()))
    if "skipped" in c:
        lines.append(f"  concepts: skipped ({c['skipped']})")
    else:
        lines.append(f"  concepts: {c['n_associated_latents']} associated latents, {c['n_concepts_covered']} of "
                     f"{c['n_concepts_tested']} concepts covered ({c['n_proteins']} proteins)")
    if "skipped" in pr:
        lines.append(f"  probes: skipped ({pr['skipped']})")
    else:
        sae_p, raw_p = pr["sae_mean_max"], pr["raw_mean"]
        raw_txt = f"raw accuracy {raw_p['accuracy']:.3f} macro-F1 {raw_p['macro_f1']:.3f}" if "accuracy" in raw_p else f"raw skipped ({raw_p['skipped']})"
        lines.append(f"  probes (location, {pr['n_classes']} classes): SAE accuracy {sae_p['accuracy']:.3f} "
                     f"macro-F1 {sae_p['macro_f1']:.3f} vs {raw_txt}")
    lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["timing_s"].items()))
    return "\n".join(lines)
