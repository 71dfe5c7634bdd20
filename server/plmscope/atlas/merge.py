"""Merge shard states of an atlas build into one atlas.

A big build is spread over machines by chunks of the corpus::

    plmscope build --corpus C --sae S --shard 0/4 --state-out st0   # on machine 0
    ...                                                              # shards 1..3 elsewhere
    plmscope merge --state st0 --state st1 --state st2 --state st3 --out atlas.duckdb

Each shard writes the mergeable aggregates of its chunks (counters, top-N and sketch reservoirs
with their sparse vectors) plus its per-protein spill files; ``merge`` adds the aggregates
(``SAEAggregate.merge``: exact, order-independent) and writes the atlas that one pass over the whole
corpus would have written.  All shards must come from the same inputs and settings (checked with
the state fingerprint) and together cover every chunk exactly once.
"""

from __future__ import annotations

import gzip
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import AtlasError
from .aggregate import SAEAggregate


def add_arguments(p) -> None:
    p.add_argument("--state", action="append", required=True, help="a shard's --state-out directory (repeatable)")
    p.add_argument("--out", required=True, help="atlas file to write (an existing atlas gets the SAEs added)")


def run(args) -> int:
    from .build import print_summary

    summary = write_atlas([Path(s) for s in args.state], Path(args.out), t0=time.time())
    print_summary(summary)
    return 0


def _load_states(roots: list[Path]) -> tuple[list[dict], dict[str, SAEAggregate]]:
    manifests = []
    for r in roots:
        try:
            manifests.append(json.loads((r / "state.json").read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise AtlasError(f"{r}: not a build state directory ({exc})") from None
    fp = manifests[0]["fingerprint"]
    for r, m in zip(roots, manifests):
        if m["fingerprint"] != fp:
            raise AtlasError(f"{r}: built from other inputs or settings than {roots[0]}; cannot merge")
        missing = sorted(set(m["chunks_mine"]) - set(m["chunks_done"]))
        if missing:
            raise AtlasError(f"{r}: shard build unfinished ({len(missing)} chunks left); rerun it with --resume")
    seen: dict[int, Path] = {}
    for r, m in zip(roots, manifests):
        for c in m["chunks_done"]:
            if c in seen:
                raise AtlasError(f"chunk {c} is in both {seen[c]} and {r}; give each shard once")
            seen[c] = r
    lacking = sorted(set(range(manifests[0]["n_chunks"])) - set(seen))
    if lacking:
        raise AtlasError(f"the states cover {len(seen)} of {manifests[0]['n_chunks']} chunks; "
                         f"missing shard(s) for chunks {lacking[:10]}")
    aggs: dict[str, SAEAggregate] = {}
    for r, m in zip(roots, manifests):
        for s in m["saes"]:
            ck = Path(m["checkpoint"])
            agg = SAEAggregate.load((ck if ck.exists() else r / ck.name) / f"{s['sae_id']}.npz")
            # spill paths are resolved inside this state dir, so states can be moved between machines
            agg.spills = [str(r / f"sae-{s['sae_id']}" / Path(p).name) for p in agg.spills]
            if s["sae_id"] in aggs:
                aggs[s["sae_id"]].merge(agg)
            else:
                aggs[s["sae_id"]] = agg
    return manifests, aggs


def write_atlas(roots: list[Path], out: Path, *, t0: float, timings: dict | None = None,
                encode_stats: dict | None = None) -> dict:
    """Merge the states in ``roots`` and publish the atlas ``out`` atomically; returns the summary.
    ``encode_stats``: per SAE id, the TopK screen's counters of this run (``TopKScreen.stats``)."""
    import duckdb
    import torch

    from ..sae.io import sae_from_bytes
    from ..store.writer import AtlasWriter, read_existing_meta
    from .build import summarize_problems
    from .finalize import LABEL_COLUMNS, label_parts, latent_tables, neighbors, protein_tables, sae_stats

    manifests, aggs = _load_states(roots)
    m0 = manifests[0]
    existing = read_existing_meta(out) if out.exists() else None
    if existing is not None:
        if existing.get("plm") not in (None, m0["plm"]):
            raise AtlasError(f"{out} holds SAEs of pLM {existing['plm']!r}; these are for {m0['plm']!r}")
        clash = sorted(set(aggs) & set(existing["_sae_ids"]))
        if clash:
            raise AtlasError(f"{out} already holds SAE {clash[0]!r}")
    problems = [p for p in m0["corpus_problems"]]
    chunk_files = sorted((r, p) for r in roots for p in r.glob("chunk-*.json.gz"))
    chunk_files = [(r, p) for r, p in chunk_files
                   if int(p.name[6:12]) in set(next(m for rr, m in zip(roots, manifests) if rr == r)["chunks_done"])]
    stats = {"n_proteins": 0, "n_residues": 0, "n_truncated": 0, "n_with_structure": 0, "n_annotations": 0, "n_structures": 0}
    with AtlasWriter(out, add_to_existing=existing is not None) as w:
        have = w.existing_accessions() if existing else set()
        have_fams = w.existing_families() if existing else set()
        with_structure = []
        for _, path in sorted(chunk_files, key=lambda x: x[1].name):
            with gzip.open(path, "rt") as fh:
                data = json.load(fh)
            problems += data["problems"]
            prots = [p for p in data["proteins"] if p["accession"] not in have]
            structs = [s for s in data["structures"] if s["accession"] not in have]
            stats["n_proteins"] += len(data["proteins"])
            stats["n_residues"] += sum(min(p["length"], p["truncated_to"] or p["length"]) for p in data["proteins"])
            stats["n_truncated"] += sum(p["truncated_to"] is not None for p in data["proteins"])
            stats["n_with_structure"] += len({s["accession"] for s in data["structures"]})
            stats["n_structures"] += len(data["structures"])
            stats["n_annotations"] += sum(len(p["annotations"]) for p in data["proteins"])
            _write_proteins(w, prots, structs)
            with_structure += [s["accession"] for s in structs]
            fams = {k: v for k, v in data["families"].items() if k not in have_fams}
            have_fams |= set(fams)
            if fams:
                w.insert("families", {"family": list(fams), "name": [v[0] for v in fams.values()],
                                      "description": [v[1] for v in fams.values()]})
        w.update_protein_flags(sorted(set(with_structure)))
        sae_summary = {}
        for s in m0["saes"]:
            sid = s["sae_id"]
            agg = aggs[sid]
            weights = next(r / f"sae-{sid}" / "sae_weights.safetensors" for r in roots
                           if (r / f"sae-{sid}" / "sae_weights.safetensors").exists()).read_bytes()
            cfg = s["cfg"]
            sae = sae_from_bytes(cfg, weights)
            st = sae_stats(agg)
            w.write_sae({"sae_id": sid, "plm": m0["plm"], "layer": int(cfg["plmscope"]["layer"]),
                         "architecture": sae.architecture, "d_in": int(cfg["d_in"]), "d_sae": int(cfg["d_sae"]),
                         "k": cfg.get("k"), "cfg": cfg, "metrics": cfg["plmscope"].get("metrics") or None,
                         "n_dead": st["n_dead"], "n_proteins": st["n_proteins"], "n_residues": st["n_residues"],
                         "hist_edges": st["hist_edges"], "aa_background": st["aa_background"], "weights": weights,
                         "built_at": None})
            top_labels = {}
            for prefix, table, column, top_col, frac_col in LABEL_COLUMNS:
                top_labels[top_col], top_labels[frac_col] = w.rank_labels(
                    table, column, sid, label_parts(agg, prefix), agg.n_active_res, agg.s.label_top)
            for table, cols in latent_tables(agg, sid, top_labels):
                w.insert(table, cols)
            with torch.no_grad():
                w.insert("latent_neighbors", neighbors(sae.W_dec, sid))
            for part in protein_tables(agg, sid):
                for table, cols in part.items():
                    w.insert(table, cols)
            sae_summary[sid] = {"n_dead": st["n_dead"], "d_sae": int(cfg["d_sae"]), "n_proteins": st["n_proteins"],
                                "n_residues": st["n_residues"], "encode": "+".join(sorted({m_s.get("encode", "dense") for m in manifests
                                                                                   for m_s in m["saes"] if m_s["sae_id"] == sid}))}
            if (encode_stats or {}).get(sid):
                sae_summary[sid]["encode_stats"] = dict(encode_stats[sid])
        skipped = summarize_problems(problems)
        elapsed = time.time() - min(float(m.get("started", t0)) for m in manifests)
        inputs = dict(m0["fingerprint"]["inputs"])
        atlas_id_src = {"fingerprint": m0["fingerprint"], "previous": existing.get("atlas_id") if existing else None}
        atlas_id = __import__("hashlib").sha256(json.dumps(atlas_id_src, sort_keys=True).encode()).hexdigest()[:16]
        summary = {"out": str(out), "n_proteins": stats["n_proteins"], "n_residues": stats["n_residues"],
                   "n_truncated": stats["n_truncated"], "n_with_structure": stats["n_with_structure"],
                   "saes": sae_summary, "skipped": skipped, "build_time_s": round(elapsed, 2),
                   "timings": {k: round(v, 2) for k, v in (timings or {}).items()}}
        prev_saes = existing.get("summary", {}).get("saes", {}) if existing else {}
        meta = {
            "atlas_id": atlas_id, "plm": m0["plm"], "created_at": datetime.now(timezone.utc).isoformat(),
            "versions": _versions(duckdb), "inputs": inputs if not existing else {"previous": existing.get("inputs"), "added": inputs},
            "build_settings": m0["fingerprint"]["settings"] | {"shards": len(roots)},
            "corpus_stats": stats, "skipped": skipped, "build_time_s": round(elapsed, 2),
            "summary": summary | {"saes": prev_saes | sae_summary},
        }
        for k, v in meta.items():
            w.set_meta(k, v)
    return summary


def _write_proteins(w, prots: list[dict], structs: list[dict]) -> None:
    if prots:
        w.insert("proteins", {
            "accession": [p["accession"] for p in prots], "entry_name": [p["entry_name"] for p in prots],
            "protein_name": [p["protein_name"] for p in prots], "organism": [p["organism"] for p in prots],
            "length": np.array([p["length"] for p in prots], np.int32), "sequence": [p["sequence"] for p in prots],
            "locations": [p["locations"] for p in prots], "families": [p["families"] for p in prots],
            "fields": [json.dumps(p["fields"]) for p in prots], "truncated_to": [p["truncated_to"] for p in prots],
            "has_structure": np.zeros(len(prots), bool)})
        ann = [(p["accession"], *a) for p in prots for a in p["annotations"]]
        if ann:
            cols = list(zip(*ann))
            w.insert("annotations", {"accession": cols[0], "kind": cols[1], "type": cols[2], "label": cols[3],
                                     "name": cols[4], "start": np.array(cols[5], np.int32),
                                     "end": np.array(cols[6], np.int32), "score": cols[7]})
    if structs:
        keys = ["structure_id", "accession", "file_name", "chain", "format", "is_prediction", "identity",
                "coverage", "source", "content"]
        w.insert("structures", {k: [s[k] for s in structs] for k in keys})
        res = [(s["structure_id"], *r) for s in structs for r in s["residues"]]
        if res:
            cols = list(zip(*res))
            w.insert("structure_residues", {"structure_id": cols[0], "seq_pos": np.array(cols[1], np.int32),
                                            "auth_seq_id": np.array(cols[2], np.int32), "ins_code": cols[3],
                                            "plddt": cols[4]})


def _versions(duckdb) -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("plmscope", "torch", "fair-esm", "numpy", "duckdb", "biopython", "gemmi", "pyhmmer"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out
