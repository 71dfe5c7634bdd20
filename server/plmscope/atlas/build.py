"""Precompute an atlas: corpus + SAEs (+ structures, Pfam) -> one DuckDB file.

One streaming pass over the corpus per (pLM, layer): a forward pass serves every SAE of that layer.
The corpus is cut into fixed chunks of ``--chunk-size`` proteins (in corpus order); each chunk's
per-protein outputs are spilled to the build-state directory (``OUT.build-state`` or
``--state-out``) and the aggregate state is checkpointed there, so ``--resume`` continues an
interrupted build from its last checkpoint and produces the same atlas.  ``--shard i/n`` processes
chunks ``i, i+n, i+2n ...`` only and, with ``--state-out DIR``, stops after writing the state;
``plmscope merge --state DIR ... --out ATLAS`` merges shard states into the atlas that one pass
would have written (aggregates are exactly mergeable).  Within a chunk, each batch's SAE encode and
aggregation run on a worker thread while the pLM computes the next batch (``encode.Pipeline``;
``--pipeline 0``: one thread), in batch order, so the atlas is the same either way.

Bad input never stops the build: rejected records (invalid residues, empty, duplicate accessions),
proteins longer than ``--max-length`` (skipped), proteins longer than the pLM's limit (kept, the pLM
sees the first residues, ``proteins.truncated_to`` records how many), unreadable or mismatching
structures and missing manifest files are counted in the summary and in ``atlas_meta.skipped``.
Exit status 2 only when no usable protein remains or an SAE does not fit the pLM / the atlas.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

from ..errors import InputError, SAEError
from ..provenance import sha256_file
from ..sequences import Problem, Protein, iter_proteins
from .aggregate import AggregateSettings, SAEAggregate
from .encode import Pipeline, SAEStage, encoder_for, release_free_heap, residue_batches

log = logging.getLogger(__name__)
STATE_VERSION = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", required=True, help="FASTA, TSV/CSV or UniProt flat file (.gz allowed)")
    p.add_argument("--structures", help="directory of PDB/mmCIF files (AlphaFold names unless --manifest)")
    p.add_argument("--manifest", help="TSV with accession, file, chain columns (e.g. demo structures.tsv)")
    p.add_argument("--pfam", help="HMMER3 file with GA cutoffs; replaces the corpus' own Pfam hits")
    p.add_argument("--families", help="TSV with pfam, name, description columns (family names)")
    p.add_argument("--sae", action="append", required=True, help="SAE directory (repeatable)")
    p.add_argument("--out", help="atlas file (.duckdb); an existing atlas gets the new SAEs added")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the build state")
    p.add_argument("--top-n", type=int, default=24, help="top examples per latent")
    p.add_argument("--bins", type=int, default=5, help="quantile bins per latent")
    p.add_argument("--per-bin", type=int, default=8, help="sampled proteins per quantile bin")
    p.add_argument("--protein-top", type=int, default=16, help="top latents stored per protein")
    p.add_argument("--token-budget", type=int, default=8192, help="padded tokens per pLM batch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--encode", choices=["auto", "dense", "screen"], default="auto",
                   help="TopK encode: 'screen' = bf16 screen + exact fp32 scores of the candidates "
                        "(same codes, ~2x faster on CPUs with AVX-512 BF16; see plmscope.sae.screen), "
                        "'dense' = one fp32 GEMM; 'auto' = screen where it applies")
    p.add_argument("--pipeline", type=int, default=1, choices=[0, 1],
                   help="1: encode and aggregate each batch on a worker thread while the pLM computes the next; "
                        "0: one thread, one stage after the other (same atlas)")
    p.add_argument("--max-length", type=int, help="skip proteins longer than this (default: keep, truncate at the pLM limit)")
    p.add_argument("--limit", type=int, help="use only the first N valid proteins")
    p.add_argument("--chunk-size", type=int, default=512, help="proteins per chunk (unit of spill, checkpoint and shard)")
    p.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds between checkpoints (0 = every chunk)")
    p.add_argument("--shard", default="0/1", help="i/n: process chunks i, i+n, ... (with --state-out)")
    p.add_argument("--state-out", help="keep the build state here and do not write an atlas (for merge)")


def reason_of(p: Problem) -> str:
    m = p.message
    for key, reason in (("invalid residue", "invalid residue"), ("stop '*'", "invalid residue"),
                        ("empty sequence", "empty sequence"), ("duplicate accession", "duplicate accession"),
                        ("--max-length", "longer than --max-length"), ("model limit", "truncated at the pLM limit"),
                        ("not found", "structure file missing"), ("does not match", "structure does not match protein"),
                        ("unreadable", "structure file corrupt"), ("no protein chain", "structure has no protein chain"),
                        ("chain", "structure chain missing")):
        if key in m:
            return reason
    return m.split(";")[0][:60]


def summarize_problems(problems: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for p in problems:
        r = out.setdefault(p["reason"], {"count": 0, "examples": []})
        r["count"] += 1
        if len(r["examples"]) < 5:
            r["examples"].append({k: p[k] for k in ("file", "record", "message", "position")})
    return dict(sorted(out.items()))


def _problem_dict(p: Problem) -> dict:
    return {"file": p.file, "record": p.record, "message": p.message, "position": p.position,
            "severity": p.severity, "reason": reason_of(p)}


def _usable_proteins(args, max_residues: int | None, problems: list[Problem] | None) -> Iterator[Protein]:
    """The corpus' usable proteins in file order (the same filters on every pass); the records
    left out (and pLM truncations) are appended to ``problems`` when it is a list."""
    n = 0
    for item in iter_proteins(args.corpus):
        if isinstance(item, Problem):
            if problems is not None:
                problems.append(item)
            continue
        if args.max_length and item.length > args.max_length:
            if problems is not None:
                problems.append(Problem(args.corpus, item.accession, f"{item.length} residues, longer than --max-length {args.max_length}; skipped"))
            continue
        if max_residues and item.length > max_residues and problems is not None:
            problems.append(Problem(args.corpus, item.accession, f"{item.length} residues; the pLM sees residues 1..{max_residues} (model limit)", severity="warning"))
        yield item
        n += 1
        if args.limit and n >= args.limit:
            return


def scan_corpus(args, max_residues: int | None) -> tuple[int, list[Problem]]:
    """First pass: how many usable proteins, and every problem.  Keeps no protein, so memory does
    not grow with the corpus; the build then streams it chunk by chunk (``iter_chunks``)."""
    problems: list[Problem] = []
    n = sum(1 for _ in _usable_proteins(args, max_residues, problems))
    if not n:
        first = f"; first problem: {problems[0]}" if problems else ""
        raise InputError(f"{args.corpus}: no usable protein records{first}")
    return n, problems


def iter_chunks(args, max_residues: int | None, wanted: set[int]) -> Iterator[tuple[int, list[Protein]]]:
    """(chunk number, proteins) of the chunks in ``wanted``, in order: consecutive runs of
    ``--chunk-size`` usable proteins in file order; only one chunk is held at a time."""
    chunk: list[Protein] = []
    c = pos = 0
    last = max(wanted, default=-1)
    for p in _usable_proteins(args, max_residues, None):
        if c > last:
            return
        if c in wanted:
            chunk.append(p)
        pos += 1
        if pos == args.chunk_size:
            if c in wanted:
                yield c, chunk
            chunk, c, pos = [], c + 1, 0
    if pos and c in wanted:
        yield c, chunk


def protein_row(p: Protein, max_residues: int | None) -> dict:
    fields = {k: v for k, v in p.fields.items() if k not in ("location", "pfam", "has_structure")}
    loc = p.fields.get("location", "") or ""
    return {
        "accession": p.accession, "entry_name": p.entry_name, "protein_name": p.protein_name, "organism": p.organism,
        "length": p.length, "sequence": p.sequence, "locations": [x.strip() for x in loc.split(";") if x.strip()],
        "families": sorted({a.label for a in p.annotations if a.kind == "pfam"}), "fields": fields,
        "truncated_to": max_residues if max_residues and p.length > max_residues else None,
        "annotations": [[a.kind, a.type, a.label, a.name, a.start, a.end, a.score] for a in p.annotations],
    }


class BuildState:
    """The build-state directory: state.json (manifest), chunk-*.json.gz, sae-<id>/ spills, ckpt/."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def manifest_path(self) -> Path:
        return self.root / "state.json"

    def read(self) -> dict | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def write(self, manifest: dict) -> None:
        tmp = self.root / "state.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1, default=str))
        tmp.replace(self.manifest_path)

    def ckpt_dir(self, n: int) -> Path:
        return self.root / f"ckpt-{n:06d}"


def _fingerprint(args, sae_dirs: list[Path], plm_spec: str) -> dict:
    inputs = {"corpus": {"path": str(args.corpus), "sha256": sha256_file(args.corpus)}, "saes": []}
    for opt in ("manifest", "pfam", "families"):
        if getattr(args, opt):
            inputs[opt] = {"path": str(getattr(args, opt)), "sha256": sha256_file(getattr(args, opt))}
    if args.structures:
        d = Path(args.structures)
        listing = sorted((f.name, f.stat().st_size) for f in d.iterdir()) if d.is_dir() else []
        inputs["structures"] = {"path": str(d), "listing_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}
    for d in sae_dirs:
        inputs["saes"].append({"path": str(d), "cfg_sha256": sha256_file(d / "cfg.json"),
                               "weights_sha256": sha256_file(d / "sae_weights.safetensors")})
    settings = {k: getattr(args, k) for k in ("top_n", "bins", "per_bin", "protein_top", "token_budget",
                                              "max_length", "limit", "chunk_size", "encode")}
    settings["plm"] = plm_spec
    return {"inputs": inputs, "settings": settings}


def run(args, *, on_checkpoint: Callable[[int], None] | None = None) -> int:
    from ..plm.base import load_plm
    from ..sae.io import load_sae, read_cfg, sae_id

    t0 = time.time()
    try:
        shard_i, shard_n = (int(x) for x in args.shard.split("/"))
        assert 0 <= shard_i < shard_n
    except (ValueError, AssertionError):
        raise InputError(f"--shard {args.shard!r}: expected i/n with 0 <= i < n") from None
    if not args.out and not args.state_out:
        raise InputError("give --out ATLAS (or --state-out DIR for a shard build)")
    if shard_n > 1 and not args.state_out:
        raise InputError("--shard i/n needs --state-out DIR; merge the shard states with `plmscope merge`")

    # ---- SAEs: all for one pLM, ids unique, not already in the atlas
    sae_dirs = [Path(d) for d in args.sae]
    cfgs = [read_cfg(d) for d in sae_dirs]
    plm_spec = cfgs[0]["plmscope"]["plm"]
    for d, c in zip(sae_dirs, cfgs):
        if c["plmscope"]["plm"] != plm_spec:
            raise SAEError(f"{d}: SAE for pLM {c['plmscope']['plm']!r}, but {sae_dirs[0]} is for {plm_spec!r}; "
                           "one atlas holds SAEs of one pLM")
    ids = [sae_id(c) for c in cfgs]
    if len(set(ids)) != len(ids):
        raise SAEError(f"two --sae directories have the same SAE id {[i for i in ids if ids.count(i) > 1][0]!r}")
    existing = None
    if args.out and Path(args.out).exists() and not args.state_out:
        from ..store.writer import read_existing_meta

        existing = read_existing_meta(args.out)
        if existing.get("plm") not in (None, plm_spec):
            raise SAEError(f"{sae_dirs[0]}: SAE for pLM {plm_spec!r}, but atlas {args.out} holds SAEs of {existing['plm']!r}")
        clash = sorted(set(ids) & set(existing["_sae_ids"]))
        if clash:
            raise SAEError(f"atlas {args.out} already holds SAE {clash[0]!r}; write to a new --out")

    plm = load_plm(plm_spec, args.device)
    saes = []
    for d, c in zip(sae_dirs, cfgs):
        layer = int(c["plmscope"]["layer"])
        plm.check_layer(layer)
        saes.append(load_sae(d, plm=plm_spec, layer=layer, d_in=plm.d_model(layer), device=plm.device))

    encoders = [encoder_for(s, args.encode, plm.device) for s in saes]
    n_usable, problems = scan_corpus(args, plm.max_residues)
    fp = _fingerprint(args, sae_dirs, plm_spec)
    chunk_len = [min(args.chunk_size, n_usable - a) for a in range(0, n_usable, args.chunk_size)]
    mine = [c for c in range(len(chunk_len)) if c % shard_n == shard_i]

    # ---- build state: fresh, or resumed when it belongs to the same inputs and settings
    root = Path(args.state_out) if args.state_out else Path(str(args.out) + ".build-state")
    state = BuildState(root)
    old = state.read() if root.exists() else None
    settings = AggregateSettings(args.top_n, args.bins, args.per_bin, args.protein_top)
    if args.resume and old and old.get("fingerprint") == fp and old.get("shard") == [shard_i, shard_n]:
        done = list(old["chunks_done"])
        aggs = [SAEAggregate.load(Path(old["checkpoint"]) / f"{i}.npz") for i in ids]
        log.info("resuming from %s: %d of %d chunks done", root, len(done), len(mine))
    else:
        if args.resume and old:
            log.warning("%s belongs to other inputs or settings; starting over", root)
        shutil.rmtree(root, ignore_errors=True)
        done, aggs = [], [SAEAggregate(s.cfg["d_sae"], settings) for s in saes]
    root.mkdir(parents=True, exist_ok=True)
    for i, s in zip(ids, saes):
        (root / f"sae-{i}").mkdir(exist_ok=True)
        if not (root / f"sae-{i}" / "sae_weights.safetensors").exists():
            from ..sae.io import sae_weights_bytes

            (root / f"sae-{i}" / "sae_weights.safetensors").write_bytes(sae_weights_bytes(s))
    manifest = {
        "version": STATE_VERSION, "fingerprint": fp, "shard": [shard_i, shard_n], "n_chunks": len(chunk_len),
        "chunks_mine": mine, "chunks_done": done, "plm": plm_spec,
        "saes": [{"sae_id": i, "dir": str(d), "cfg": c, "encode": "bf16-screen" if e is not None else "dense"}
                 for i, d, c, e in zip(ids, sae_dirs, cfgs, encoders)],
        "corpus_problems": [_problem_dict(p) for p in problems], "started": t0,
        "checkpoint": old.get("checkpoint") if done else None,
    }
    state.write(manifest)

    if args.pfam:
        from .pfam import read_hmms

        read_hmms(args.pfam)  # fail early on a bad HMM file
    timings = _stream_pass(args, plm, saes, encoders, aggs, ids=ids, root=root, state=state, manifest=manifest,
                           done=done, chunk_len=chunk_len, mine=mine, on_checkpoint=on_checkpoint)
    encode_stats = {i: e.stats for i, e in zip(ids, encoders) if e is not None}
    # write_atlas reloads the checkpointed state: drop the models and the in-memory state first,
    # so that the write phase does not hold two copies of the state (or a 650M pLM it no longer needs)
    del aggs, encoders, saes, plm
    if args.state_out:
        print(f"plmscope build: shard {shard_i}/{shard_n} state written to {root} "
              f"({sum(chunk_len[c] for c in mine)} proteins); merge with `plmscope merge --state {root} ... --out ATLAS`")
        return 0
    from .merge import write_atlas

    tw = time.perf_counter()
    summary = write_atlas([root], Path(args.out), t0=t0, timings=timings, encode_stats=encode_stats)
    summary["timings"]["finalize+write_atlas"] = round(time.perf_counter() - tw, 2)
    shutil.rmtree(root, ignore_errors=True)
    print_summary(summary)
    return 0


def _stream_pass(args, plm, saes, encoders, aggs, *, ids, root, state, manifest, done, chunk_len, mine,
                 on_checkpoint) -> dict:
    """The streaming pass over this shard's chunks (``mine``) not yet ``done``: forward, encode,
    aggregate, spill and checkpoint each chunk; ``done`` grows as chunks finish.  Returns the
    seconds per stage.  A function of its own so that its per-batch arrays and loop variables
    (the last SAE, aggregate and batch) are gone before the write phase."""
    pfam_hits, pfam_families = ({}, {})
    families = _read_families(args.families) if args.families else {}

    from tqdm import tqdm

    sae_stage = SAEStage(saes, encoders, aggs, ids, root, plm.device, slots=args.pipeline + 1)
    groups = defaultdict(list)  # layer -> SAE indices
    for j, s in enumerate(saes):
        groups[int(s.layer)].append(j)
    todo = [c for c in mine if c not in set(done)]
    total = sum(chunk_len[c] for c in mine)
    bar = tqdm(total=total, initial=total - sum(chunk_len[c] for c in todo), unit="prot", desc="build",
               dynamic_ncols=True, mininterval=1.0)
    last_ckpt = time.time()
    n_res = 0
    timings = defaultdict(float)  # seconds per stage, reported in the summary and atlas_meta
    with Pipeline(in_flight=args.pipeline) as pipeline:
        for c, chunk in iter_chunks(args, plm.max_residues, set(todo)):
            if args.pfam:
                from .pfam import annotate

                pfam_hits, pfam_families = annotate(chunk, args.pfam)
                for p in chunk:
                    p.annotations = [a for a in p.annotations if a.kind != "pfam"] + pfam_hits.get(p.accession, [])
            tw = time.perf_counter()
            _write_chunk(root, c, chunk, plm.max_residues, args, families, pfam_families)
            timings["structures+chunk_files"] += time.perf_counter() - tw
            sae_stage.start_chunk(c, {p.accession: [("family", a.label, a.start, a.end) for a in p.annotations
                                                    if a.kind == "pfam"]
                                      + [("type", a.type, a.start, a.end) for a in p.annotations] for p in chunk})
            for layer, members in groups.items():
                items = [(p.accession, p.sequence) for p in chunk]
                stream = plm.iter_representations(items, layer, token_budget=args.token_budget,
                                                  sort_window=len(items) or 1)
                tf = time.perf_counter()
                for batch in residue_batches(stream, args.token_budget):
                    timings["plm_forward"] += time.perf_counter() - tf
                    tw = time.perf_counter()
                    packed = sae_stage.pack(batch)
                    n_prot = len(batch)
                    del batch  # the forward's tensors: gone before the next forward (see pack)
                    ts = time.perf_counter()
                    # waits for the batch before (serial build: runs this one, so the wait is the
                    # stage's own encode + aggregation time, also counted under their names)
                    pipeline.submit(sae_stage, packed, members)
                    timings["sae_handoff"] += ts - tw
                    timings["sae_wait"] += time.perf_counter() - ts
                    if layer == next(iter(groups)):
                        n_res += packed[3].shape[0]
                        bar.update(n_prot)
                        bar.set_postfix(residues=n_res, refresh=False)
                    tf = time.perf_counter()
            tw = time.perf_counter()
            pipeline.wait()
            timings["sae_wait"] += time.perf_counter() - tw
            tw = time.perf_counter()
            sae_stage.end_chunk()
            done.append(c)
            if args.checkpoint_every <= 0 or time.time() - last_ckpt >= args.checkpoint_every or c == todo[-1]:
                _checkpoint(state, manifest, done, ids, aggs)
                last_ckpt = time.time()
            timings["spill+checkpoint"] += time.perf_counter() - tw
            release_free_heap()
            if on_checkpoint is not None and manifest["chunks_done"] == done:
                on_checkpoint(len(done))
    for k, v in sae_stage.timings.items():
        timings[k] += v
    bar.close()
    if not todo:
        _checkpoint(state, manifest, done, ids, aggs)
    return timings


def _checkpoint(state: BuildState, manifest: dict, done: list[int], ids: list[str], aggs: list[SAEAggregate]) -> None:
    """Aggregates into a fresh ckpt dir, then one atomic manifest update points at it."""
    ck = state.ckpt_dir(len(done))
    shutil.rmtree(ck, ignore_errors=True)
    ck.mkdir()
    for i, agg in zip(ids, aggs):
        agg.save(ck / f"{i}.npz")
    previous = manifest.get("checkpoint")
    manifest["chunks_done"] = list(done)
    manifest["checkpoint"] = str(ck)
    state.write(manifest)
    if previous and Path(previous) != ck:
        shutil.rmtree(previous, ignore_errors=True)


def _read_families(path: str) -> dict[str, tuple[str, str]]:
    import csv

    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read families table ({exc})") from None
    key = "pfam" if rows and "pfam" in rows[0] else "family"
    if rows and key not in rows[0]:
        raise InputError(f"{path}: families table needs a 'pfam' (or 'family') column; found {list(rows[0])}")
    return {r[key]: (r.get("name") or "", r.get("description") or "") for r in rows}


def _write_chunk(root: Path, c: int, chunk: list[Protein], max_residues, args, families, pfam_families) -> None:
    """Per-chunk protein rows, annotations, structures (+ their problems) as gzipped JSON."""
    from .structures import StructureRecord, find_structures, load_structure

    rows = [protein_row(p, max_residues) for p in chunk]
    structures, problems = [], []
    if args.structures or args.manifest:
        seqs = {p.accession: p.sequence for p in chunk}
        jobs, problems = find_structures(args.structures, args.manifest, set(seqs))
        for job in jobs:
            rec = load_structure(job, seqs[job.accession])
            if isinstance(rec, StructureRecord):
                structures.append(rec.__dict__)
            else:
                problems.append(rec)
    fams = {}
    for p in chunk:
        for a in p.annotations:
            if a.kind == "pfam":
                name, desc = families.get(a.label) or pfam_families.get(a.label) or (a.name, "")
                fams[a.label] = [name or a.name, desc]
    data = {"proteins": rows, "structures": structures, "families": fams,
            "problems": [_problem_dict(p) for p in problems]}
    tmp = root / f"chunk-{c:06d}.json.gz.tmp"
    with gzip.open(tmp, "wt") as fh:
        json.dump(data, fh)
    tmp.replace(root / f"chunk-{c:06d}.json.gz")


def print_summary(s: dict) -> None:
    lines = [f"plmscope build: wrote {s['out']} in {s['build_time_s']:.1f} s",
             f"  proteins: {s['n_proteins']}  residues: {s['n_residues']}  truncated: {s['n_truncated']}  "
             f"with structure: {s['n_with_structure']}"]
    for sid, d in s["saes"].items():
        enc = d.get("encode", "dense")
        if d.get("encode_stats"):
            st = d["encode_stats"]
            enc += (f", {st['candidates'] / max(st['rows'], 1):.0f} candidates/residue rescored, "
                    f"{st['dense_rows']} of {st['rows']} residues dense")
        lines.append(f"  SAE {sid}: {d['n_dead']} dead of {d['d_sae']} latents (encode: {enc})")
    if s.get("timings"):
        lines.append("  time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s["timings"].items()))
    if s["skipped"]:
        lines.append("  skipped / changed:")
        for reason, d in s["skipped"].items():
            ex = d["examples"][0]
            lines.append(f"    {reason}: {d['count']} (e.g. {ex['file']}, record {ex['record']!r}: {ex['message']})")
    print("\n".join(lines))
