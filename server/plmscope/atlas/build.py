"""Precompute an atlas: corpus + SAEs (+ structures, Pfam) -> one DuckDB file.

One streaming pass over the corpus per (pLM, layer): a forward pass serves every SAE of that layer.
The corpus is cut into fixed chunks of ``--chunk-size`` proteins (in corpus order); each chunk's
per-protein outputs are spilled to the build-state directory (``OUT.build-state`` or
``--state-out``) and the aggregate state is checkpointed there, so ``--resume`` continues an
interrupted build from its last checkpoint and produces the same atlas.  ``--ray [ADDRESS]`` runs
the shards on a Ray cluster and merges them (``raybuild``).  ``--shard i/n`` processes
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
import errno
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import atomic, faults
from ..errors import AtlasError, SAEError
from ..sequences import Problem
from .aggregate import SAEAggregate
from .buildstate import STATE_VERSION, BuildJob, BuildState, ChunkPlan, built_from, fingerprint, resumable
from .chunks import chunk_sizes, problem_record, scan_corpus
from .publish import check_joinable, print_summary, write_atlas
from .settings import DEFAULTS as D, DTYPES, ENCODE_MODES, BuildSettings
from .stream import Models, StreamPass

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", required=True, help="FASTA, TSV/CSV or UniProt flat file (.gz allowed)")
    p.add_argument("--structures", help="directory of PDB/mmCIF files (AlphaFold names unless --manifest)")
    p.add_argument("--manifest", help="TSV with accession, file, chain columns (e.g. demo structures.tsv)")
    p.add_argument("--pfam", help="HMMER3 file with GA cutoffs; replaces the corpus' own Pfam hits")
    p.add_argument("--families", help="TSV with pfam, name, description columns (family names)")
    p.add_argument("--sae", action="append", required=True, help="SAE directory (repeatable)")
    p.add_argument("--out", help="atlas file (.duckdb); an existing atlas gets the new SAEs added")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the build state")
    p.add_argument("--top-n", type=int, default=D["top_n"], help="top examples per latent")
    p.add_argument("--bins", type=int, default=D["bins"], help="quantile bins per latent")
    p.add_argument("--per-bin", type=int, default=D["per_bin"], help="sampled proteins per quantile bin")
    p.add_argument("--protein-top", type=int, default=D["protein_top"], help="top latents stored per protein")
    p.add_argument("--token-budget", type=int, default=D["token_budget"], help="padded tokens per pLM batch")
    p.add_argument("--device", default=D["device"], help="auto | cpu | cuda[:i]")
    p.add_argument("--dtype", choices=DTYPES, default=D["dtype"], help="pLM precision: auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 (CUDA, or CPUs with native bf16: avx512_bf16/amx), fp16 (CUDA)")
    p.add_argument("--encode", choices=ENCODE_MODES, default=D["encode"],
                   help="TopK encode: 'screen' = bf16 screen + exact fp32 scores of the candidates "
                        "(same codes, faster on CPUs with native bf16; see plmscope.sae.screen), "
                        "'dense' = one fp32 GEMM; 'auto' = screen where it applies")
    p.add_argument("--pipeline", type=int, default=D["pipeline"], choices=[0, 1],
                   help="1: encode and aggregate each batch on a worker thread while the pLM computes the next; "
                        "0: one thread, one stage after the other (same atlas)")
    p.add_argument("--max-length", type=int, help="skip proteins longer than this (default: keep, truncate at the pLM limit)")
    p.add_argument("--limit", type=int, help="use only the first N valid proteins")
    p.add_argument("--chunk-size", type=int, default=D["chunk_size"],
                   help="proteins per chunk (unit of spill, checkpoint and shard)")
    p.add_argument("--checkpoint-every", type=float, default=D["checkpoint_every"],
                   help="seconds between checkpoints (0 = every chunk)")
    p.add_argument("--shard", default="{}/{}".format(*D["shard"]),
                   help="i/n: process chunks i, i+n, ... (with --state-out)")
    p.add_argument("--concept-proteins", type=int, default=D["concept_proteins"],
                   help="keep the per-residue SAE codes of up to N concept proteins (annotated or with a structure) in "
                        "the atlas, so `plmscope analyze` does not recompute them (0: none; default %(default)s, "
                        "analyze's default --max-proteins)")
    p.add_argument("--state-out", help="keep the build state here and do not write an atlas (for merge)")
    from .raybuild import add_arguments as add_ray_arguments

    add_ray_arguments(p)


def run(args: argparse.Namespace) -> int:
    settings = BuildSettings.from_args(args)
    if args.ray is not None:
        from .raybuild import RaySettings, build_on_ray

        print_summary(build_on_ray(settings, RaySettings.from_args(args)))
        return 0
    result = build(settings)
    if result.summary is not None:
        print_summary(result.summary)
    else:
        i, n = settings.shard
        print(f"plmscope build: shard {i}/{n} state written to {result.path} ({result.n_proteins} proteins); "
              f"merge with `plmscope merge --state {result.path} ... --out ATLAS`")
    return 0


@dataclass(frozen=True)
class BuildResult:
    path: Path  # the atlas, or the shard's build state (a --state-out build)
    n_proteins: int  # this shard's proteins
    summary: dict | None  # publish.write_atlas's summary; None for a --state-out build
    timings: dict | None = None  # seconds per stage of this run's streaming pass (a --state-out build)
    encode_stats: dict | None = None  # per SAE id, its TopK screen's counters of this run


@dataclass(frozen=True)
class SAEInputs:
    """The ``--sae`` directories' configs: all for one pLM, ids unique."""

    dirs: tuple[Path, ...]
    cfgs: tuple[dict, ...]
    ids: tuple[str, ...]
    plm: str

    @classmethod
    def read(cls, dirs: tuple[Path, ...]) -> "SAEInputs":
        from ..sae.io import read_cfg, sae_id

        cfgs = tuple(read_cfg(d) for d in dirs)
        plm = cfgs[0]["plmscope"]["plm"]
        for d, c in zip(dirs, cfgs):
            if c["plmscope"]["plm"] != plm:
                raise SAEError(f"{d}: SAE for pLM {c['plmscope']['plm']!r}, but {dirs[0]} is for {plm!r}; "
                               "one atlas holds SAEs of one pLM")
        ids = tuple(sae_id(c) for c in cfgs)
        if len(set(ids)) != len(ids):
            raise SAEError(f"two --sae directories have the same SAE id {[i for i in ids if ids.count(i) > 1][0]!r}")
        return cls(dirs, cfgs, ids, plm)


def build(settings: BuildSettings, *, on_checkpoint: Callable[[int], None] | None = None,
          on_progress: Callable[[int, int, int], None] | None = None) -> BuildResult:
    """Build the atlas ``settings.out`` (or, with ``state_out``, a shard's build state).
    ``on_checkpoint(n)``: called after each checkpoint with the number of chunks done.
    ``on_progress(proteins_done, proteins_total, residues)``: called after each batch instead of
    drawing a progress bar (``plmscope build --ray`` draws one bar over all shards)."""
    t0 = time.time()
    inputs = SAEInputs.read(settings.saes)
    fp = fingerprint(settings, list(inputs.dirs), inputs.plm)
    if settings.writes_atlas and settings.out.exists():
        from ..store.reader import read_existing_meta

        existing = read_existing_meta(settings.out)
        if settings.resume and built_from(existing, fp, inputs.ids):
            # killed after publishing, before the build state was removed: the atlas is done
            log.info("%s already holds this build; removing its build state %s", settings.out, settings.state_dir)
            shutil.rmtree(settings.state_dir, ignore_errors=True)
            summary = existing.get("summary") or {}
            return BuildResult(settings.out, int(summary.get("n_proteins", 0)), summary or None)
        check_joinable(existing, settings.out, inputs.plm, inputs.ids)
    if settings.pfam:
        from .pfam import read_hmms

        read_hmms(settings.pfam)  # fail before the pass on a bad HMM file
    try:
        plan, timings, encode_stats = _stream_phase(settings, inputs, fp, t0, on_checkpoint, on_progress)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        raise AtlasError(f"{settings.state_dir}: writing the build state failed ({exc.strerror}); free space "
                         "(or raise the limit) and rerun with --resume to continue from the last checkpoint") from None
    n_proteins = plan.proteins(plan.mine)
    if not settings.writes_atlas:
        return BuildResult(settings.state_dir, n_proteins, None, dict(timings), encode_stats)
    faults.point("build:streamed")
    tw = time.perf_counter()
    summary = write_atlas([settings.state_dir], settings.out, timings=timings, encode_stats=encode_stats)
    summary["timings"]["finalize+write_atlas"] = round(time.perf_counter() - tw, 2)
    faults.point("build:published")
    shutil.rmtree(settings.state_dir, ignore_errors=True)
    return BuildResult(settings.out, n_proteins, summary)


def _stream_phase(settings: BuildSettings, inputs: SAEInputs, fp: dict, t0: float,
                  on_checkpoint, on_progress=None) -> tuple[ChunkPlan, dict, dict]:
    """Load the models, scan the corpus, open the build state and stream.  A function of its own:
    the write phase reloads the checkpointed state, so the models and the in-memory aggregates
    must be gone by then, not held twice (or a large pLM held for nothing)."""
    models = load_models(settings, inputs)
    n_usable, problems, concept_codes = scan_corpus(settings, models.plm.max_residues)
    plan = ChunkPlan(tuple(chunk_sizes(n_usable, settings.chunk_size)), settings.shard)
    job = open_job(settings, inputs, models, plan, problems, fp, t0)
    timings = StreamPass(settings, models, job, on_checkpoint, on_progress, codes_for=frozenset(concept_codes)).run()
    return plan, timings, models.encode_stats(job.ids)


def load_models(settings: BuildSettings, inputs: SAEInputs) -> Models:
    from ..plm.base import load_plm
    from ..sae.io import load_sae
    from .encode import encoder_for

    plm = load_plm(inputs.plm, settings.device, settings.dtype)
    saes = []
    for d, c in zip(inputs.dirs, inputs.cfgs):
        layer = int(c["plmscope"]["layer"])
        plm.check_layer(layer)
        saes.append(load_sae(d, plm=inputs.plm, layer=layer, d_in=plm.d_model(layer), device=plm.device))
    return Models(plm, saes, [encoder_for(s, settings.encode, plm.device) for s in saes])


def open_job(settings: BuildSettings, inputs: SAEInputs, models: Models, plan: ChunkPlan,
             problems: list[Problem], fp: dict, t0: float) -> BuildJob:
    """The build state: resumed when ``--resume`` finds a checkpoint of the same inputs, settings
    and shard, else started afresh (``--resume`` says why); its manifest written."""
    state = BuildState(settings.state_dir)
    old = state.read() if state.root.exists() else None
    ckpt = state.checkpoint_of(old) if settings.resume and resumable(old, fp, settings.shard) else None
    if ckpt is not None:
        done = list(old["chunks_done"])
        aggs = [SAEAggregate.load(ckpt / f"{i}.npz") for i in inputs.ids]
        state.clean(ckpt, aggs)
        log.info("resuming from %s: %d of %d chunks done", state.root, len(done), len(plan.mine))
    else:
        if settings.resume:
            log.warning("--resume: %s; starting from the first chunk", _why_not_resumable(state, old, fp, settings))
        shutil.rmtree(state.root, ignore_errors=True)
        done, aggs = [], [SAEAggregate(s.cfg["d_sae"], settings.aggregate_settings(models.plm.context_free_positions))
                       for s in models.saes]
    state.root.mkdir(parents=True, exist_ok=True)
    _store_sae_weights(state, inputs.ids, models.saes)
    manifest = {
        "version": STATE_VERSION, "fingerprint": fp, "shard": list(settings.shard), "n_chunks": len(plan.sizes),
        "chunks_mine": plan.mine, "proteins_mine": plan.proteins(plan.mine), "chunks_done": done, "plm": inputs.plm,
        "saes": [{"sae_id": i, "dir": str(d), "cfg": c, "encode": "bf16-screen" if e is not None else "dense"}
                 for i, d, c, e in zip(inputs.ids, inputs.dirs, inputs.cfgs, models.encoders)],
        "corpus_problems": [problem_record(p) for p in problems], "started": t0,
        "checkpoint": str(ckpt) if ckpt is not None else None,
    }
    state.write(manifest)
    faults.point("build:state-opened")
    return BuildJob(state, manifest, plan, list(inputs.ids), aggs, done)


def _why_not_resumable(state: BuildState, old: dict | None, fp: dict, settings: BuildSettings) -> str:
    if not state.root.exists():
        return f"no build state at {state.root}"
    if old is None:
        return f"{state.root} holds no readable state.json (interrupted before its first write)"
    if not resumable(old, fp, settings.shard):
        return f"{state.root} belongs to other inputs, settings or shard, or an older plmscope"
    return f"{state.root} has no checkpoint yet (interrupted before the first one)"


def _store_sae_weights(state: BuildState, ids, saes) -> None:
    """Each SAE's weights in the state, so a merge elsewhere needs nothing but the state."""
    from ..sae.io import sae_weights_bytes

    for i, s in zip(ids, saes):
        path = state.sae_dir(i) / "sae_weights.safetensors"
        path.parent.mkdir(exist_ok=True)
        if not path.exists():  # written whole or not at all: a resumed build trusts one that is there
            tmp = atomic.temp_path(path)
            tmp.write_bytes(sae_weights_bytes(s))
            tmp.replace(path)
