"""Live pLM + SAE inference for the web app.

* Models are loaded once, in the app's lifespan (``load_models``), never at import time.
* Requests go through one bounded queue.  A batcher task takes every waiting request (up to
  ``infer_batch_size``) and runs them as one pLM batch on a worker thread, so the event loop keeps
  serving pages while the model computes.  Under load, requests pile up while a batch computes
  and the next batch takes them; only then (the previous batch had company) does a lone first
  request wait up to ``infer_max_wait_ms`` for others.  A request on an idle server never waits:
  that wait was most of ``/api/infer``'s overhead over a bare forward (``scripts/bench_server.py``).
* Up to ``infer_workers`` batches compute at once, each on its own worker thread, and the torch
  threads (``infer_threads``; by default the CPUs the server may use, or 1 when the models run on
  a GPU: ``worker_thread_count``) are shared out between the batches running when one starts.
  A lone request gets every thread; under load two one-thread forwards run side by side, which
  on 2 cores serves 1.3x the requests of one two-thread forward at a time, where batching alone
  gains 1.16x (small matrices keep a second thread half idle).  The pLM forward and the SAE keep
  no state between calls, so batches can share them (``tests/plm/test_esm2.py`` runs threads).
* Worker threads are set up once (``_init_worker``) with a lower CPU priority (``infer_nice``).
  OpenMP starts its pools from them, so the pools inherit the priority: a forward still uses
  every core when the server is otherwise idle, but page requests (event loop, DuckDB reads in
  the thread pool) preempt it on shared cores instead of waiting for it.
* A full queue raises ``QueueFull`` (the route answers 503 + Retry-After) instead of letting
  latency grow without bound.
* Results are cached by (SAE, sha256 of the sequence) in a bounded LRU.  Cached results are sparse
  (only non-zero activations) so that a 1000-residue x 4096-latent result costs kilobytes.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, ModelError
from ..sequences import clean_sequence
from ..threads import default_threads, set_torch_threads

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the inference queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class RateLimited(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"too many inference requests from this client; retry in {retry_after} s")
        self.retry_after = retry_after


class SequenceTooLong(InputError):
    pass


# ---- input ----
def parse_sequence_input(text: str) -> tuple[str, str, list[str]]:
    """A bare sequence or FASTA text -> (record header, clean sequence, headers of ignored records)."""
    text = (text or "").strip()
    if not text:
        raise InputError("no sequence given: paste a protein sequence or a FASTA record")
    if not text.startswith(">"):
        seq, problems = clean_sequence(text, file="input", record="sequence")
        if seq is None:
            raise InputError(str(problems[0]).replace("input, record 'sequence'", "the sequence"))
        return "", seq, []
    records: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith(">"):
            records.append((line[1:].strip(), []))
        elif records:
            records[-1][1].append(line)
    header, lines = records[0]
    seq, problems = clean_sequence("".join(lines), file="input", record=header or "record 1")
    if seq is None:
        raise InputError(str(problems[0]).replace("input, ", "FASTA "))
    return header, seq, [h for h, _ in records[1:]]


def sequence_hash(seq: str) -> str:
    return hashlib.sha256(seq.encode()).hexdigest()


# ---- results ----
@dataclass
class LiveResult:
    """Sparse SAE activations of one sequence (rows = residues, 0-based)."""

    sae_id: str
    length: int
    pos: np.ndarray  # int32, residue index of each non-zero
    lat: np.ndarray  # int32, latent of each non-zero
    val: np.ndarray  # float32, activation
    context_free: int = 0  # leading residues left out of the summaries (the pLM's context-free positions)
    summary_latents: np.ndarray = field(init=False)
    summary_max: np.ndarray = field(init=False)
    summary_argmax: np.ndarray = field(init=False)
    summary_count: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        counted = self.pos >= self.context_free  # as the atlas's statistics: vector() still has them all
        lat, val, pos = self.lat[counted], self.val[counted], self.pos[counted]
        if lat.size == 0:
            empty = np.zeros(0, dtype=np.int64)
            self.summary_latents, self.summary_max, self.summary_argmax, self.summary_count = empty, empty.astype(float), empty, empty
            return
        # Grouped by latent with a stable sort (a radix sort on uint16 keys: a 300-residue, k 64
        # result in 0.4 ms against 1.9 ms for lexsort on (latent, -value)); the maximum's position
        # is the first residue reaching it, as before.
        key = lat.astype(np.uint16) if int(lat.max()) < 65536 else lat
        order = np.argsort(key, kind="stable")
        lat_sorted, val_sorted = lat[order], val[order]
        first = np.flatnonzero(np.r_[True, lat_sorted[1:] != lat_sorted[:-1]])
        count = np.diff(np.r_[first, lat_sorted.size])
        best = np.maximum.reduceat(val_sorted, first)
        at_best = np.where(val_sorted == np.repeat(best, count), np.arange(lat_sorted.size), lat_sorted.size)
        self.summary_latents = lat_sorted[first]
        self.summary_max = best.astype(np.float64)
        self.summary_argmax = pos[order][np.minimum.reduceat(at_best, first)]
        self.summary_count = count

    def top(self, k: int) -> list[dict]:
        idx = np.argsort(-self.summary_max, kind="stable")[:k]
        return [
            {"latent": int(self.summary_latents[i]), "max_act": round(float(self.summary_max[i]), 4),
             "max_pos": int(self.summary_argmax[i]) + 1, "n_active": int(self.summary_count[i])}
            for i in idx
        ]

    def vector(self, latent: int) -> list[float]:
        out = np.zeros(self.length, dtype=np.float64)
        m = self.lat == latent
        out[self.pos[m]] = self.val[m]
        return np.round(out, 4).tolist()


def sparse_activations(sae, rep) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(residue, latent, value) of every non-zero SAE activation of ``rep`` (n, d_in).

    A TopK SAE's ``encode_topk`` gives the k kept values per residue directly: the dense (n, d_sae)
    matrix that ``encode`` scatters them into, and the scan of it for non-zeros, cost a fifth of a
    300-residue request (4,096 latents).  Same values as ``encode``: the ReLU keeps exactly its
    non-zeros.  Other SAEs go through ``encode``.
    """
    import torch

    x = rep.to(sae.W_dec.device)
    if getattr(sae, "architecture", None) == "topk":
        vals, idx = sae.encode_topk(x)
        vals = vals.float().cpu()
        keep = vals > 0
        pos = torch.arange(vals.shape[0]).unsqueeze(1).expand_as(vals)[keep]
        return (pos.numpy().astype(np.int32), idx.cpu()[keep].numpy().astype(np.int32),
                vals[keep].numpy().astype(np.float32))
    z = sae.encode(x).float().cpu()
    pos, lat = torch.nonzero(z > 0, as_tuple=True)
    return pos.numpy().astype(np.int32), lat.numpy().astype(np.int32), z[pos, lat].numpy().astype(np.float32)


@dataclass
class _Job:
    sae_id: str
    seq: str
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)
    timing: dict | None = None  # filled with queue_ms / model_ms / batch for the caller's Server-Timing


@dataclass
class LoadedModel:
    sae_id: str
    plm: object  # ProteinLM
    sae: object  # SparseAutoencoder
    layer: int
    max_residues: int | None


def load_models(reader, device: str, dtype: str = "auto") -> dict[str, LoadedModel]:
    """Every SAE embedded in the atlas and its pLM (each pLM loaded once); raises ModelError/SAEError."""
    import torch

    from ..plm import load_plm
    from ..sae.io import sae_from_bytes

    plms: dict[str, object] = {}
    out: dict[str, LoadedModel] = {}
    for s in reader.saes():
        cfg, weights = reader.sae_weights(s["sae_id"])
        sae = sae_from_bytes(cfg, weights)
        if s["plm"] not in plms:
            plms[s["plm"]] = load_plm(s["plm"], device, dtype)
        plm = plms[s["plm"]]
        sae = sae.to(plm.device).eval()
        torch.set_grad_enabled(False)
        out[s["sae_id"]] = LoadedModel(s["sae_id"], plm, sae, int(s["layer"]), plm.max_residues)
    return out


def _all_on_gpus(devices) -> bool:
    devices = list(devices)
    return bool(devices) and all(getattr(d, "type", str(d)) == "cuda" for d in devices)


def worker_count(setting: int, devices, cpus: int) -> int:
    """Batches that may compute at once: ``setting`` where given (> 0); else 1 when every model runs
    on a GPU (its batches gain 2.2x from batching alone), else 2 where at least 2 CPUs are usable."""
    if setting > 0:
        return setting
    return 1 if _all_on_gpus(devices) else (2 if cpus >= 2 else 1)


def worker_thread_count(setting: int, devices, default: int) -> int:
    """The inference worker's torch threads: ``setting`` where given (> 0); else 1 when every model
    runs on a GPU, else ``default`` (the CPUs the server may use).

    On a GPU the worker's CPU side only launches kernels and handles small results, and a pool of
    sleeping OpenMP threads (``OMP_WAIT_POLICY=PASSIVE``) costs more to wake than it saves: on an
    H200, a 300-residue ESM-2 650M request's compute took 25.1 ms with 16 threads against 21.3 ms
    with 1 (p50 of 30, the bare forward 19.7 ms; ``scripts/bench_server.py --infer-variants``)."""
    if setting > 0:
        return setting
    return 1 if _all_on_gpus(devices) else default


class InferenceService:
    """Micro-batching queue + LRU cache + per-client rate limit in front of the loaded models."""

    def __init__(self, models: dict[str, LoadedModel], settings):
        self.models = models
        self.settings = settings
        self._cache: collections.OrderedDict[tuple[str, str], LiveResult] = collections.OrderedDict()
        self._queue: asyncio.Queue[_Job] | None = None
        self._pending = 0  # waiting + running jobs: what the queue limit counts
        self._worker: asyncio.Task | None = None
        self.worker_threads: int | None = None  # torch threads of the worker, read back once it starts
        self.worker_nice: int | None = None  # the worker's nice value, read back likewise
        devices = [m.plm.device for m in models.values()]
        self.threads = worker_thread_count(settings.infer_threads, devices, default_threads())
        self.workers = worker_count(settings.infer_workers, devices, self.threads)
        self._running = 0  # batches and jobs computing now: how the threads are shared out
        self._slots: asyncio.Semaphore | None = None
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="plmscope-infer",
                                            initializer=self._init_worker)
        self._hits: dict[str, collections.deque] = {}
        self._batch_seconds = 0.1  # running estimate of one batch's duration, for Retry-After
        self.batches_run = 0

    def _init_worker(self) -> None:
        import os

        if self.settings.infer_nice and hasattr(os, "setpriority"):
            tid = threading.get_native_id()  # Linux: a thread id sets that thread's priority alone
            try:
                os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self.settings.infer_nice)
                self.worker_nice = os.getpriority(os.PRIO_PROCESS, tid)
            except OSError as e:  # a platform or sandbox without per-thread priorities: run at normal priority
                log.warning("could not lower the inference thread's priority: %s", e)
        self.worker_threads = set_torch_threads(self.threads)

    async def _on_worker(self, fn, *args):
        """``fn(*args)`` on a worker thread, with the torch threads shared out between the batches
        and jobs computing when it starts (torch's thread count is per thread: the others keep theirs)."""
        self._running += 1
        share = max(1, self.threads // self._running)

        def call():
            set_torch_threads(share)
            return fn(*args)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        finally:
            self._running -= 1

    # lifecycle (called from the lifespan, inside the server's event loop)
    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.workers)
        # Start the worker threads now (not on the first request), so their setup is not timed there.
        loop = asyncio.get_running_loop()
        started = threading.Barrier(self.workers)  # each call holds its thread until all have started
        await asyncio.gather(*[loop.run_in_executor(self._executor, started.wait) for _ in range(self.workers)])
        self._worker = asyncio.create_task(self._run(), name="plmscope-infer-batcher")

    async def stop(self) -> None:
        if self._worker:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def queue_depth(self) -> int:
        return self._pending

    # ---- limits ----
    def max_length(self, sae_id: str) -> int:
        model_limit = self.models[sae_id].max_residues
        limit = self.settings.max_residues
        return min(limit, model_limit) if model_limit else limit

    def check_rate(self, client: str) -> None:
        """Sliding one-minute window per client address."""
        limit = self.settings.rate_limit_per_minute
        if limit <= 0:
            return
        now = time.monotonic()
        hits = self._hits.setdefault(client, collections.deque())
        while hits and now - hits[0] >= 60.0:
            hits.popleft()
        if len(hits) >= limit:
            raise RateLimited(max(1, math.ceil(60.0 - (now - hits[0]))))
        hits.append(now)
        if len(self._hits) > 10_000:  # bound memory under many clients: forget idle ones
            for key in [k for k, v in self._hits.items() if not v or now - v[-1] >= 60.0]:
                del self._hits[key]

    # ---- the public call ----
    async def infer(self, sae_id: str, seq: str, timing: dict | None = None) -> tuple[LiveResult, bool]:
        """(result, from_cache).  Raises SequenceTooLong, QueueFull, ModelError.

        ``timing``, when given, receives where this request's time went: ``queue_ms`` (waiting for
        its batch to start), ``model_ms`` (its batch's pLM + SAE compute on the worker thread) and
        ``batch`` (requests in that batch); nothing for a cached result."""
        if sae_id not in self.models:
            raise ModelError(f"SAE {sae_id!r} is not loaded on this server")
        limit = self.max_length(sae_id)
        if len(seq) > limit:
            raise SequenceTooLong(
                f"the sequence has {len(seq)} residues; this server accepts at most {limit} "
                f"(cut it into pieces, or run `plmscope build` offline)"
            )
        key = (sae_id, sequence_hash(seq))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit, True
        if self._pending >= self.settings.infer_queue_size:
            waves = math.ceil(self._pending / self.settings.infer_batch_size)
            raise QueueFull(max(1, math.ceil(waves * self._batch_seconds)))
        fut = asyncio.get_running_loop().create_future()
        self._pending += 1
        self._queue.put_nowait(_Job(sae_id, seq, fut, timing=timing))
        try:
            result = await fut
        finally:
            self._pending -= 1
        if self.settings.cache_size > 0:
            self._cache[key] = result
            while len(self._cache) > self.settings.cache_size:
                self._cache.popitem(last=False)
        return result, False

    async def run_job(self, fn, *args):
        """``fn(*args)`` on a worker thread (with its share of the torch threads, as a batch), behind
        the same queue limit as inference: QueueFull (503 + Retry-After) when that many are waiting.
        The caller checks the client's rate first, as for inference."""
        if self._pending >= self.settings.infer_queue_size:
            waves = math.ceil(self._pending / self.settings.infer_batch_size)
            raise QueueFull(max(1, math.ceil(waves * self._batch_seconds)))
        self._pending += 1
        try:
            return await self._on_worker(fn, *args)
        finally:
            self._pending -= 1

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self.settings.infer_max_wait_ms / 1000.0
        # infer_batch_size bounds the sequences computing at once, so each worker's batch takes its share
        size = max(1, math.ceil(self.settings.infer_batch_size / self.workers))
        busy = False  # the last batch had more than one request: others are likely on their way
        tasks: set[asyncio.Task] = set()
        while True:
            await self._slots.acquire()  # a worker is free: form the next batch
            try:
                batch = [await self._queue.get()]
            except asyncio.CancelledError:
                self._slots.release()
                raise
            await asyncio.sleep(0)  # let requests that arrived together reach the queue
            while len(batch) < size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            deadline = loop.time() + wait
            while busy and len(batch) < size:
                remaining = deadline - loop.time()
                try:
                    job = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(), remaining)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                batch.append(job)
            busy = len(batch) > 1
            batch = [j for j in batch if not j.future.done()]  # clients that went away
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run_batch(batch))
            tasks.add(task)  # a reference until it ends: the loop keeps only weak ones
            task.add_done_callback(tasks.discard)

    async def _run_batch(self, batch: list[_Job]) -> None:
        try:
            t0 = time.perf_counter()
            try:
                results = await self._on_worker(self._compute, [(j.sae_id, j.seq) for j in batch])
            except Exception as exc:  # a model failure must fail these requests, not the worker
                log.exception("live inference failed for a batch of %d", len(batch))
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(ModelError(f"inference failed: {type(exc).__name__}"))
                return
            self.batches_run += 1
            t1 = time.perf_counter()
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (t1 - t0)
            for j in batch:
                if j.timing is not None:
                    j.timing.update(queue_ms=(t0 - j.queued) * 1000, model_ms=(t1 - t0) * 1000, batch=len(batch))
            for j, r in zip(batch, results):
                if not j.future.done():
                    j.future.set_result(r)
        finally:
            self._slots.release()

    def _compute(self, items: list[tuple[str, str]]) -> list[LiveResult]:
        """One pLM forward per (pLM, layer) over the batch's distinct sequences, then each SAE."""
        import torch

        out: dict[tuple[str, str], LiveResult] = {}
        groups: dict[tuple[int, int], list[str]] = {}
        for sae_id, seq in items:
            m = self.models[sae_id]
            groups.setdefault((id(m.plm), m.layer), [])
            if seq not in groups[(id(m.plm), m.layer)]:
                groups[(id(m.plm), m.layer)].append(seq)
        reps: dict[tuple[int, int, str], torch.Tensor] = {}
        for (plm_id, layer), seqs in groups.items():
            plm = next(m.plm for m in self.models.values() if id(m.plm) == plm_id)
            for seq, rep in zip(seqs, plm.representations(seqs, layer)):
                reps[(plm_id, layer, seq)] = rep
        with torch.no_grad():
            for sae_id, seq in items:
                if (sae_id, seq) in out:
                    continue
                m = self.models[sae_id]
                rep = reps[(id(m.plm), m.layer, seq)]
                pos, lat, val = sparse_activations(m.sae, rep)
                out[(sae_id, seq)] = LiveResult(sae_id, rep.shape[0], pos, lat, val, m.plm.context_free_positions)
        return [out[it] for it in items]
