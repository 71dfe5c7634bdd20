"""The write phase of ``build`` and ``merge``: build states -> one published atlas.

``write_atlas`` merges the aggregates of the states (one for a build, one per shard for a merge),
writes the chunk files' proteins, structures and families, each SAE's tables and the atlas
metadata through ``store.writer.AtlasWriter``, which publishes the file atomically (a temporary
file renamed over ``out`` once complete; on an error ``out`` is left as it was).  An existing
``out`` gets the SAEs added.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np

from .. import faults
from ..errors import AtlasError
from .aggregate import SAEAggregate
from .buildstate import BuildState, load_states
from .chunks import chunk_path

CORPUS_STATS = ("n_proteins", "n_residues", "n_truncated", "n_with_structure", "n_annotations", "n_structures")


def check_joinable(existing: dict, out: Path, plm: str, sae_ids) -> None:
    """An existing atlas takes new SAEs of its own pLM whose ids it does not hold yet."""
    if existing.get("plm") not in (None, plm):
        raise AtlasError(f"atlas {out} holds SAEs of pLM {existing['plm']!r}; these SAEs are for {plm!r}")
    clash = sorted(set(sae_ids) & set(existing["_sae_ids"]))
    if clash:
        raise AtlasError(f"atlas {out} already holds SAE {clash[0]!r}; write to a new --out")


def write_atlas(roots: list[Path], out: Path, *, timings: dict | None = None,
                encode_stats: dict | None = None, summary_extra: dict | None = None,
                meta_extra: dict | None = None, started: float | None = None) -> dict:
    """Merge the states in ``roots`` and publish the atlas ``out`` atomically; returns the summary.
    ``timings``: seconds per stage of the streaming pass; ``encode_stats``: per SAE id, the TopK
    screen's counters of this run (``TopKScreen.stats``); ``summary_extra``: added to the summary
    (``build --ray``: per-shard timings); ``meta_extra``: more ``atlas_meta`` keys (``build
    --ray``: the cluster and its settings); ``started``: when the build began (default: when its
    first state was opened)."""
    from ..store.reader import read_existing_meta

    manifests, aggs = load_states(roots)
    m0 = manifests[0]
    existing = read_existing_meta(out) if out.exists() else None
    if existing is not None:
        check_joinable(existing, out, m0["plm"], aggs)
    try:
        return _write(roots, out, manifests, aggs, existing, timings, encode_stats, summary_extra, meta_extra, started)
    except OSError as exc:  # disk full (ENOSPC), a file size limit (EFBIG), a read-only directory ...
        raise AtlasError(f"{out}: writing the atlas failed ({exc.strerror or exc}); {_kept(out, existing)}") from None
    except (duckdb.IOException, duckdb.FatalException) as exc:  # DuckDB's own writes failing the same way
        raise AtlasError(f"{out}: writing the atlas failed ({str(exc).splitlines()[0]}); "
                         f"{_kept(out, existing)}") from None


def _kept(out: Path, existing: dict | None) -> str:
    old = f"the previous {out} is unchanged" if existing is not None else f"no {out} was written"
    return (f"{old} and the build state is kept: free space (or raise the limit) and rerun "
            "(`plmscope build ... --resume`, or the same `plmscope merge`)")


def _write(roots, out, manifests, aggs, existing, timings, encode_stats, summary_extra=None, meta_extra=None,
           started=None) -> dict:
    from ..store.writer import AtlasWriter

    m0 = manifests[0]
    with AtlasWriter(out, add_to_existing=existing is not None) as w:
        stats, chunk_problems = _write_chunks(w, _chunk_files(roots, manifests), existing is not None)
        faults.point("write:chunks")
        saes = {s["sae_id"]: _write_sae(w, roots, manifests, s, aggs[s["sae_id"]]) for s in m0["saes"]}
        for sid, stats_now in (encode_stats or {}).items():
            if stats_now and sid in saes:
                saes[sid]["encode_stats"] = dict(stats_now)
        summary = {"out": str(out), **{k: stats[k] for k in CORPUS_STATS[:4]}, "saes": saes,
                   "skipped": summarize_problems(m0["corpus_problems"] + chunk_problems),
                   "build_time_s": round(time.time() - (started or min(float(m["started"]) for m in manifests)), 2),
                   "timings": {k: round(v, 2) for k, v in (timings or {}).items()}, **(summary_extra or {})}
        _write_meta(w, manifests, stats, summary, existing)
        for k, v in (meta_extra or {}).items():
            w.set_meta(k, v)
    return summary


def _chunk_files(roots: list[Path], manifests: list[dict]) -> list[Path]:
    """The chunk files of every chunk done, in chunk order."""
    files = sorted((c, chunk_path(r, c)) for r, m in zip(roots, manifests) for c in m["chunks_done"])
    for c, path in files:
        if not path.is_file():
            raise AtlasError(f"{path.parent}: chunk {c} is done but its file {path.name} is missing")
    return [path for _, path in files]


def _write_chunks(w, files: list[Path], adding: bool) -> tuple[dict, list[dict]]:
    """Proteins, annotations, structures and families of the chunk files (those an existing atlas
    holds already are left as they are); returns the corpus statistics and the chunks' problems."""
    have = w.existing_accessions() if adding else set()
    have_fams = w.existing_families() if adding else set()
    stats = dict.fromkeys(CORPUS_STATS, 0)
    problems, with_structure = [], []
    for path in files:
        with gzip.open(path, "rt") as fh:
            data = json.load(fh)
        problems += data["problems"]
        _count(stats, data)
        structs = [s for s in data["structures"] if s["accession"] not in have]
        _write_proteins(w, [p for p in data["proteins"] if p["accession"] not in have], structs)
        with_structure += [s["accession"] for s in structs]
        fams = {k: v for k, v in data["families"].items() if k not in have_fams}
        have_fams |= set(fams)
        if fams:
            w.insert("families", {"family": list(fams), "name": [v[0] for v in fams.values()],
                                  "description": [v[1] for v in fams.values()]})
    w.update_protein_flags(sorted(set(with_structure)))
    return stats, problems


def _count(stats: dict, data: dict) -> None:
    prots, structs = data["proteins"], data["structures"]
    stats["n_proteins"] += len(prots)
    stats["n_residues"] += sum(min(p["length"], p["truncated_to"] or p["length"]) for p in prots)
    stats["n_truncated"] += sum(p["truncated_to"] is not None for p in prots)
    stats["n_with_structure"] += len({s["accession"] for s in structs})
    stats["n_structures"] += len(structs)
    stats["n_annotations"] += sum(len(p["annotations"]) for p in prots)


def _write_sae(w, roots: list[Path], manifests: list[dict], entry: dict, agg: SAEAggregate) -> dict:
    """One SAE's row and tables; returns its part of the summary."""
    import torch

    from ..sae.io import sae_from_bytes
    from .finalize import (LABEL_COLUMNS, label_parts, latent_tables, neighbors, protein_tables, residue_code_tables,
                           sae_stats)

    sid, cfg = entry["sae_id"], entry["cfg"]
    paths = (BuildState(r).sae_dir(sid) / "sae_weights.safetensors" for r in roots)
    weights = next(p for p in paths if p.exists()).read_bytes()
    sae = sae_from_bytes(cfg, weights)
    st = sae_stats(agg)
    w.write_sae({"sae_id": sid, "plm": manifests[0]["plm"], "layer": int(cfg["plmscope"]["layer"]),
                 "architecture": sae.architecture, "d_in": int(cfg["d_in"]), "d_sae": int(cfg["d_sae"]),
                 "k": cfg.get("k"), "cfg": cfg, "metrics": cfg["plmscope"].get("metrics") or None,
                 "n_dead": st["n_dead"], "n_proteins": st["n_proteins"], "n_residues": st["n_residues"],
                 "context_free": st["context_free"], "hist_edges": st["hist_edges"], "aa_background": st["aa_background"], "weights": weights,
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
    n_coded = sum(w.insert("residue_codes", cols) for cols in residue_code_tables(agg, sid))
    encode = sorted({s["encode"] for m in manifests for s in m["saes"] if s["sae_id"] == sid})
    return {"n_dead": st["n_dead"], "d_sae": int(cfg["d_sae"]), "n_proteins": st["n_proteins"],
            "n_residues": st["n_residues"], "encode": "+".join(encode), "n_concept_code_proteins": n_coded}


def _write_meta(w, manifests: list[dict], stats: dict, summary: dict, existing: dict | None) -> None:
    m0 = manifests[0]
    inputs = dict(m0["fingerprint"]["inputs"])
    atlas_id_src = {"fingerprint": m0["fingerprint"], "previous": existing.get("atlas_id") if existing else None}
    prev_saes = existing.get("summary", {}).get("saes", {}) if existing else {}
    meta = {
        "atlas_id": hashlib.sha256(json.dumps(atlas_id_src, sort_keys=True).encode()).hexdigest()[:16],
        "plm": m0["plm"], "created_at": datetime.now(timezone.utc).isoformat(),
        "versions": _versions(duckdb),
        "inputs": inputs if not existing else {"previous": existing.get("inputs"), "added": inputs},
        "build_settings": m0["fingerprint"]["settings"] | {"shards": len(manifests)},
        "corpus_stats": stats, "skipped": summary["skipped"], "build_time_s": summary["build_time_s"],
        "summary": summary | {"saes": prev_saes | summary["saes"]},
    }
    for k, v in meta.items():
        w.set_meta(k, v)


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


def summarize_problems(problems: list[dict]) -> dict:
    """Problems by reason: ``{reason: {count, examples}}``, the first 5 of each as examples."""
    out: dict[str, dict] = {}
    for p in problems:
        r = out.setdefault(p["reason"], {"count": 0, "examples": []})
        r["count"] += 1
        if len(r["examples"]) < 5:
            r["examples"].append({k: p[k] for k in ("file", "record", "message", "position")})
    return dict(sorted(out.items()))


def print_summary(s: dict) -> None:
    lines = [f"plmscope build: wrote {s['out']} in {s['build_time_s']:.1f} s",
             f"  proteins: {s['n_proteins']}  residues: {s['n_residues']}  truncated: {s['n_truncated']}  "
             f"with structure: {s['n_with_structure']}"]
    for sid, d in s["saes"].items():
        enc = d["encode"]
        if d.get("encode_stats"):
            st = d["encode_stats"]
            enc += (f", {st['candidates'] / max(st['rows'], 1):.0f} candidates/residue rescored, "
                    f"{st['dense_rows']} of {st['rows']} residues dense")
        lines.append(f"  SAE {sid}: {d['n_dead']} dead of {d['d_sae']} latents (encode: {enc}); "
                     f"residue codes of {d.get('n_concept_code_proteins', 0)} concept proteins kept for analyze")
    if s.get("timings"):
        lines.append("  time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s["timings"].items()))
    for sh in s.get("shards") or []:  # build --ray
        how = "skipped (done before --resume)" if sh.get("skipped") else (
            f"{sh['seconds']:.1f} s on {sh['host']}" + (", resumed after a failed attempt" if sh.get("resumed") else ""))
        lines.append(f"  shard {sh['shard']}: {sh['proteins']} proteins, {how}")
    if s["skipped"]:
        lines.append("  skipped / changed:")
        for reason, d in s["skipped"].items():
            ex = d["examples"][0]
            lines.append(f"    {reason}: {d['count']} (e.g. {ex['file']}, record {ex['record']!r}: {ex['message']})")
    print("\n".join(lines))
