"""``plmscope build --ray [ADDRESS]``: the build's shards scheduled on a Ray cluster.

The corpus's chunks are dealt to ``--ray-shards`` shards exactly as ``--shard i/n`` deals them; each
shard is one Ray task that runs the ordinary streaming build (``build.build`` with ``state_out``:
the pLM and the SAEs loaded once per shard, one GPU per task where the cluster has GPUs) and writes
its mergeable state under ``--ray-state`` (a directory every node of the cluster sees; default
``OUT.ray-state``).  The driver then merges the states and publishes the atlas with
``publish.write_atlas``, as ``plmscope merge`` does, so the atlas equals a single-process build of
the same inputs table by table.  Without ADDRESS a local cluster is started (and stopped); in a
process that has called ``ray.init`` already, that cluster is used.

Faults.  A worker that dies mid-shard (killed, out of memory, node lost) is a system failure, which
Ray retries (``--ray-retries``); the retry resumes the shard from the last checkpoint its state
holds (the state directory outlives the worker), so the atlas is the same.  A shard that fails
with an error of its own (an SAE that does not fit, a corpus with no usable record) is not
retried: the build stops, names the shard and the error, and keeps the states.  Records the corpus
rejects never fail a shard: each shard scans the whole corpus and records every rejected record
(file, record, why), and the summary counts them once, as a single-process build does.
``--resume`` skips the shards whose states are complete and resumes the others.

Progress: the shards report proteins and residues after each batch to a small actor; the driver
draws one bar over all shards.  The summary lists each shard's time and host, and ``atlas_meta``
key ``ray`` records the cluster and the settings.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .. import faults
from ..errors import AtlasError, InputError, PlmscopeError
from .build import SAEInputs, build
from .buildstate import STATE_VERSION, built_from, fingerprint, resumable
from .publish import check_joinable, write_atlas
from .settings import BuildSettings

log = logging.getLogger(__name__)
LOCAL = "local"


@dataclass(frozen=True)
class RaySettings:
    """How ``build --ray`` uses the cluster; none of it changes the atlas."""

    address: str = LOCAL  # "local": start a cluster in this process (or use the one ray.init made)
    workers: int | None = None  # shards in flight; None: one per GPU of the cluster, else one per CPU
    shards: int | None = None  # None: as many as workers
    cpus_per_worker: int = 1  # a CPU worker's torch threads (Ray sets OMP_NUM_THREADS to it)
    gpus: bool | None = None  # one GPU per worker; None: where the cluster has GPUs and --device is not cpu
    retries: int = 3  # times a shard whose worker died is run again
    state: Path | None = None  # shard states; default OUT.ray-state; must be shared by every node
    local_cpus: int | None = None  # a local cluster's CPUs (default: this machine's)

    def __post_init__(self) -> None:
        if self.state is not None:
            object.__setattr__(self, "state", Path(self.state))
        for name in ("workers", "shards", "cpus_per_worker", "local_cpus"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--ray-{name.replace('_', '-')} must be at least 1, got {value}")
        if self.retries < 0:
            raise InputError(f"--ray-retries must be at least 0, got {self.retries}")

    @classmethod
    def from_args(cls, args) -> "RaySettings":
        return cls(address=args.ray, workers=args.ray_workers, shards=args.ray_shards,
                   cpus_per_worker=args.ray_cpus_per_worker, retries=args.ray_retries, state=args.ray_state)


def add_arguments(p) -> None:
    g = p.add_argument_group("Ray (pip install 'plmscope[ray]')")
    g.add_argument("--ray", nargs="?", const=LOCAL, metavar="ADDRESS",
                   help="run the shards on a Ray cluster (ADDRESS, e.g. ray://head:10001 or auto); "
                        "without ADDRESS a local one")
    g.add_argument("--ray-workers", type=int, help="shards in flight (default: one per GPU, else per CPU)")
    g.add_argument("--ray-shards", type=int, help="shards the corpus is cut into (default: --ray-workers)")
    g.add_argument("--ray-cpus-per-worker", type=int, default=1, help="CPUs (torch threads) of a CPU worker")
    g.add_argument("--ray-retries", type=int, default=3, help="reruns of a shard whose worker died")
    g.add_argument("--ray-state", help="shard states, on storage every node sees (default OUT.ray-state)")


def check_settings(s: BuildSettings) -> None:
    if s.state_out is not None or s.shard != (0, 1):
        raise InputError("--ray shards the build itself; leave out --shard and --state-out")


def shard_dir(root: Path, i: int, n: int) -> Path:
    return root / f"shard-{i:04d}-of-{n:04d}"


def build_on_ray(settings: BuildSettings, rs: RaySettings) -> dict:
    """Build the atlas ``settings.out`` on a Ray cluster; returns ``publish.write_atlas``'s summary."""
    check_settings(settings)
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'plmscope[ray]'") from None
    t0 = time.time()
    inputs = SAEInputs.read(settings.saes)
    fp = fingerprint(settings, list(inputs.dirs), inputs.plm)
    root = rs.state if rs.state is not None else Path(f"{settings.out}.ray-state")
    if settings.out.exists():
        from ..store.reader import read_existing_meta

        existing = read_existing_meta(settings.out)
        if settings.resume and built_from(existing, fp, inputs.ids):
            log.info("%s already holds this build; removing the shard states %s", settings.out, root)
            shutil.rmtree(root, ignore_errors=True)
            return existing.get("summary") or {}
        check_joinable(existing, settings.out, inputs.plm, inputs.ids)
    if not settings.resume:
        shutil.rmtree(root, ignore_errors=True)
    started_here = not ray.is_initialized()
    if started_here:
        _init(ray, rs)
    try:
        shards, meta = _run_shards(ray, settings, rs, fp, root)
    finally:
        if started_here:
            ray.shutdown()
    faults.point("build:streamed")
    n = len(shards)
    tw = time.perf_counter()
    timings: dict[str, float] = {}
    encode_stats: dict[str, dict] = {}
    for sh in shards:
        for k, v in sh.pop("timings", {}).items():  # worker seconds, summed over the shards
            timings[k] = timings.get(k, 0.0) + v
        for sid, st in sh.pop("encode_stats", {}).items():
            acc = encode_stats.setdefault(sid, {})
            for k, v in st.items():
                acc[k] = acc.get(k, 0) + v
    timings["ray_shards_wall"] = time.time() - t0
    summary = write_atlas([shard_dir(root, i, n) for i in range(n)], settings.out, timings=timings,
                          encode_stats=encode_stats, summary_extra={"shards": shards}, meta_extra={"ray": meta},
                          started=t0)
    summary["timings"]["finalize+write_atlas"] = round(time.perf_counter() - tw, 2)
    faults.point("build:published")
    shutil.rmtree(root, ignore_errors=True)
    return summary


def _init(ray, rs: RaySettings) -> None:
    if rs.address == LOCAL:
        # the states travel through the shared directory, not the object store: keep it small
        ray.init(num_cpus=rs.local_cpus or os.cpu_count(), include_dashboard=False,
                 object_store_memory=100 * 1024 ** 2, configure_logging=False)
    else:
        ray.init(address=rs.address, configure_logging=False)


def _run_shards(ray, settings: BuildSettings, rs: RaySettings, fp: dict, root: Path) -> tuple[list[dict], dict]:
    """Run every shard not done yet, at most ``workers`` at a time, under one progress bar; returns
    per shard its record (time, host, stage timings) and the ``ray`` provenance."""
    resources = ray.cluster_resources()
    n_gpus = int(resources.get("GPU", 0))
    gpus = rs.gpus if rs.gpus is not None else (n_gpus > 0 and settings.device != "cpu")
    if gpus and n_gpus == 0:
        raise InputError("--ray: one GPU per worker asked for, but the cluster has no GPU")
    workers = rs.workers or (n_gpus if gpus else max(1, int(resources.get("CPU", 1)) // rs.cpus_per_worker))
    n = rs.shards or workers
    per_task = {"num_gpus": 1, "num_cpus": rs.cpus_per_worker} if gpus else {"num_cpus": rs.cpus_per_worker}
    env = {k: os.environ[k] for k in (faults.ENV, faults.ONCE_ENV) if os.environ.get(k)}
    task = ray.remote(_shard_task).options(max_retries=rs.retries, retry_exceptions=False, **per_task,
                                           runtime_env={"env_vars": env} if env else None)
    meta = {"address": rs.address, "ray_version": ray.__version__, "workers": workers, "shards": n,
            "per_worker": per_task, "retries": rs.retries, "state": str(root),
            "cluster": {"nodes": sum(1 for x in ray.nodes() if x.get("Alive")),
                        "CPU": resources.get("CPU", 0), "GPU": resources.get("GPU", 0)}}
    records: dict[int, dict] = {}
    todo = []
    for i in range(n):
        done = _finished(shard_dir(root, i, n), fp, (i, n))
        if done is not None:
            records[i] = {"shard": f"{i}/{n}", "proteins": done, "skipped": True}
        else:
            todo.append(i)
    root.mkdir(parents=True, exist_ok=True)
    progress = ray.remote(num_cpus=0)(_Progress).remote()
    for i, rec in records.items():
        progress.report.remote(i, "done", rec["proteins"], rec["proteins"], 0)
    log.info("ray: %d shards (%d done before), %d in flight, per worker %s", n, n - len(todo), workers, per_task)
    pending: dict = {}
    with _Bar(ray, progress, n) as bar:
        while todo or pending:
            while todo and len(pending) < workers:
                i = todo.pop(0)
                s_i = replace(settings, out=None, state_out=shard_dir(root, i, n), shard=(i, n), resume=True)
                pending[task.remote(s_i, progress)] = i
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            bar.refresh()
            for ref in ready:
                i = pending.pop(ref)
                try:
                    records[i] = ray.get(ref)
                except Exception as exc:
                    for other in pending:
                        ray.cancel(other, force=True)
                    raise _shard_error(ray, exc, i, n, rs, root) from None
    return [records[i] for i in range(n)], meta


def _shard_error(ray, exc: Exception, i: int, n: int, rs: RaySettings, root: Path) -> Exception:
    keep = f"the shard states are kept in {root}: rerun with --resume to build only what is missing"
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, PlmscopeError):
            return type(cause)(f"shard {i}/{n}: {cause}")
        return AtlasError(f"shard {i}/{n} failed: {str(exc).strip().splitlines()[-1]}; {keep}")
    if isinstance(exc, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.OutOfMemoryError)):
        return AtlasError(f"shard {i}/{n}: its worker died {rs.retries + 1} times ({type(exc).__name__}); {keep}")
    return AtlasError(f"shard {i}/{n}: {type(exc).__name__}: {exc}; {keep}")


def _finished(root: Path, fp: dict, shard: tuple[int, int]) -> int | None:
    """The proteins of the shard state at ``root`` when it is complete and of these inputs and
    settings (``--resume`` skips it), else None."""
    import json

    try:
        m = json.loads((root / "state.json").read_text())
    except (OSError, ValueError):
        return None
    if not resumable(m, fp, shard) or m.get("version") != STATE_VERSION:
        return None
    if set(m["chunks_mine"]) - set(m["chunks_done"]) or not m.get("checkpoint"):
        return None
    return int(m.get("proteins_mine", 0))


def _shard_task(settings: BuildSettings, progress) -> dict:
    """One shard, in a Ray worker: the streaming build into its state directory."""
    i, n = settings.shard
    resumed = (settings.state_out / "state.json").exists()  # a retry after the worker died (or --resume)
    attempt = f"{socket.gethostname()}:{os.getpid()}"
    t0 = time.perf_counter()

    def report(done: int, total: int, residues: int) -> None:
        progress.report.remote(i, attempt, done, total, residues)

    result = build(replace(settings, resume=resumed), on_progress=report)
    return {"shard": f"{i}/{n}", "proteins": result.n_proteins, "seconds": round(time.perf_counter() - t0, 2),
            "host": socket.gethostname(), "pid": os.getpid(), "resumed": resumed,
            "timings": result.timings or {}, "encode_stats": result.encode_stats or {}}


class _Progress:
    """Ray actor: per shard, the latest attempt's (proteins done, proteins total, residues)."""

    def __init__(self) -> None:
        self.shards: dict[int, tuple[str, int, int, int]] = {}

    def report(self, shard: int, attempt: str, done: int, total: int, residues: int) -> None:
        self.shards[shard] = (attempt, done, total, residues)

    def totals(self) -> tuple[int, int, int, int]:
        """(proteins done, proteins total, residues, shards reporting)."""
        v = self.shards.values()
        return sum(x[1] for x in v), sum(x[2] for x in v), sum(x[3] for x in v), len(v)


class _Bar:
    """One tqdm bar over all shards: proteins (rate, ETA; the total estimated until every shard
    has said its own) and residues per second."""

    def __init__(self, ray, progress, n: int) -> None:
        from tqdm import tqdm

        self.ray, self.progress, self.n = ray, progress, n
        self.bar = tqdm(total=None, unit="prot", desc=f"build ({n} shards)", dynamic_ncols=True, mininterval=1.0)
        self.t0, self.res0 = time.time(), None

    def __enter__(self):
        return self

    def refresh(self) -> None:
        done, total, residues, reporting = self.ray.get(self.progress.totals.remote())
        if reporting:  # shards not started yet: as large as the mean of those that have said
            self.bar.total = total if reporting == self.n else round(total * self.n / reporting)
        self.bar.update(done - self.bar.n)
        # a retried shard starts its residue count again: the rate dips, it never goes negative
        rate = residues / max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix(residues=residues, res_per_s=f"{rate:,.0f}", refresh=False)

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.refresh()
        self.bar.close()
