"""The SAE side of the build's streaming pass: encode a batch of pLM representations with every
SAE of its layer, fold the codes into the aggregates and spill their per-protein outputs in parts.

``SAEStage`` does that for one batch; ``Pipeline`` runs it on a worker thread, so that batch i is
encoded and aggregated while the main thread computes the pLM forward of batch i+1 (on a GPU the
aggregation's numpy work then hides behind the GPU; on a CPU the forward leaves gaps between its
kernels that the worker fills).  One worker and at most one batch in flight keep the
batches in order, so the atlas does not depend on the threading.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import SAEError
from ._state import state_empty
from .aggregate import SAEAggregate, sparse_codes


SPILL_BYTES = 8 << 20


def spill_path(root: Path, sae: str, chunk: int, part: int) -> Path:
    """Spill file ``part`` of ``chunk``.  A chunk's per-protein outputs are written whenever
    ``SPILL_BYTES`` of them are pending, so they never pile up between the batches' temporaries
    (a chunk's outputs grow with chunk size x SAE width).  The names follow
    from the batches, so a chunk redone after an interruption rewrites the same files; only the
    checkpointed ``spills`` list counts."""
    return root / f"sae-{sae}" / f"spill-{chunk:06d}-{part:03d}.npz"


def release_free_heap() -> None:
    """Hand the allocator's free pages back to the OS (glibc ``malloc_trim``; elsewhere a no-op).

    Called after each spill (part or chunk end), when the batches' temporaries and the spilled
    outputs are gone.  glibc otherwise keeps freed pages inside its heap, so that RSS
    would stay at the highest point any batch reached.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def residue_batches(stream, budget: int):
    """Group the pLM stream ((id, sequence the pLM saw, representation(s)) items) into batches of
    about ``budget`` residues for the SAE encoder."""
    batch, n = [], 0
    for item in stream:
        batch.append(item)
        n += len(item[1])
        if n >= budget:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def encoder_for(sae, mode: str, device: torch.device):
    """The TopK screen for ``sae`` when ``mode`` asks for it (or 'auto' and it applies), else None."""
    from ..sae.screen import TopKScreen, screen_applies

    if mode == "dense" or sae.architecture != "topk":
        return None
    if mode == "auto" and not screen_applies(sae, device):
        return None
    try:
        return TopKScreen(sae)
    except ValueError as exc:
        raise SAEError(f"--encode screen: {exc}") from None


ENCODE_BLOCK_BYTES = 16 << 20


def encode_block_rows(sae) -> int:
    """Rows per encode block: ``ENCODE_BLOCK_BYTES`` of fp32 pre-activations (1024 rows of a
    4096-latent SAE).  A whole batch at once would be a large transient and no faster: in blocks
    the top-k reads from cache."""
    return max(128, ENCODE_BLOCK_BYTES // (4 * int(sae.W_dec.shape[0])))


def encode_scratch(sae, screen) -> torch.Tensor | None:
    """The reusable pre-activation buffer of ``sparse_encode`` for a dense-encoded TopK SAE, else None.

    Allocated once per build: a fresh (rows, d_sae) block per encode call would come and go
    between the aggregation's longer-lived arrays and fragment the heap."""
    if screen is not None or sae.architecture != "topk":
        return None
    return torch.empty(encode_block_rows(sae), int(sae.W_dec.shape[0]), dtype=sae.W_enc.dtype,
                       device=sae.W_enc.device)


@torch.no_grad()
def sparse_encode(sae, X: torch.Tensor, screen=None, max_rows: int | None = None, scratch: torch.Tensor | None = None):
    """Sparse (rows, latents, values) of ``sae.encode(X)``, in row blocks to bound memory.

    The blocks are of equal size, not ``max_rows`` plus a small remainder: a short GEMM call
    costs far more per row than a tall one.  ``scratch``
    (``encode_scratch``) holds the dense TopK path's pre-activations when given.
    """
    if screen is not None:  # its own block size: its bf16 buffer is half the size per row
        max_rows = max_rows or screen.block_rows
    max_rows = max_rows or encode_block_rows(sae)
    if scratch is not None:
        max_rows = min(max_rows, scratch.shape[0])
    n = X.shape[0]
    n_chunks = max(1, -(-n // max_rows))
    step = -(-n // n_chunks) if n else 1
    parts = []
    for a in range(0, n, step):
        x = X[a : a + step]
        if screen is not None or (sae.architecture == "topk" and hasattr(sae, "encode_topk")):
            # TopK codes are k values per row: take them straight from the top-k instead of
            # scattering into a dense (rows, d_sae) matrix and scanning it again (the same values
            # as SparseAutoencoder.encode, which scatters exactly these; the screen finds the same).
            vals, idx = screen(x) if screen is not None else sae.encode_topk(x, out=scratch)
            keep = vals > 0
            rows = keep.nonzero()[:, 0]  # row-major: rows ascending, as the dense scan gave
            parts.append(((rows + a).cpu().numpy(), idx[keep].cpu().numpy().astype(np.int64),
                          vals[keep].float().cpu().numpy()))
        else:
            parts.append(sparse_codes(sae.encode(x).cpu(), a))
    if not parts:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))


# Residues per aggregation update: a pLM batch (~8k residues) is folded in pieces of whole
# proteins of about this many residues.  The aggregates do not depend on how the proteins are
# grouped (exactly mergeable), and the update's temporaries (~40 bytes per non-zero code) shrink
# 4x: beside the forward's own temporaries they set the pipelined build's peak RSS, which
# otherwise grows with the corpus as a longer build meets more of the forward's peaks.
SUB_ROWS = 2048


def _pieces(ends: np.ndarray, rows: int) -> list[tuple[int, int]]:
    """Consecutive protein ranges [p0, p1) of about ``rows`` residues (at least one protein each),
    for proteins ending at the cumulative residue counts ``ends``."""
    out, p0, start = [], 0, 0
    n = len(ends)
    while p0 < n:
        p1 = max(int(np.searchsorted(ends, start + rows, side="right")), p0 + 1)
        out.append((p0, p1))
        start = int(ends[p1 - 1])
        p0 = p1
    return out


def pooled_representations(X: torch.Tensor, lengths: torch.Tensor, context_free: int = 0):
    """Per protein, the mean and the per-dimension maximum of its rows of ``X`` (proteins
    concatenated, ``lengths`` rows each), leaving out each protein's first ``context_free`` rows
    (0 for a protein with no other row).  The max-pooled one is kept so that the raw-pLM probe
    can be pooled as the SAE probe is (mean + max) without analyze recomputing the pLM."""
    n_prot = len(lengths)
    prot_of_row = torch.repeat_interleave(torch.arange(n_prot), lengths).to(X.device)
    counted = lengths - context_free
    if context_free:
        starts = torch.cumsum(lengths, 0) - lengths
        keep = (torch.arange(X.shape[0]) - starts.repeat_interleave(lengths) >= context_free).to(X.device)
        X, prot_of_row = X[keep], prot_of_row[keep]
    means = (torch.zeros(n_prot, X.shape[1], device=X.device).index_add_(0, prot_of_row, X)
             / counted.clamp_min(1).to(X.device)[:, None]).cpu().numpy()
    maxes = (torch.full((n_prot, X.shape[1]), -torch.inf, dtype=X.dtype, device=X.device)
             .scatter_reduce_(0, prot_of_row[:, None].expand_as(X), X, "amax"))
    maxes = torch.where(counted.to(X.device)[:, None] > 0, maxes, 0).float().cpu().numpy()
    return means, maxes


class SAEStage:
    """Encode + aggregate one batch for the SAEs of its layer, spilling parts as they fill.

    ``timings`` (seconds of ``sae_encode`` and ``aggregate``) and ``parts`` are the stage's own:
    while a ``Pipeline`` runs it, only the worker touches them and the aggregates, and the main
    thread reads them after ``Pipeline.wait``."""

    def __init__(self, saes, encoders, aggs: list[SAEAggregate], ids: list[str], root: Path,
                 device: torch.device, *, slots: int = 2, codes_for: frozenset[str] = frozenset()) -> None:
        self.saes, self.encoders, self.aggs, self.ids, self.root = saes, encoders, aggs, ids, root
        self.codes_for = codes_for
        self.device = device
        self.scratches = [encode_scratch(s, e) for s, e in zip(saes, encoders)]
        self.timings: dict[str, float] = defaultdict(float)
        self.chunk = -1
        self.parts = [0] * len(aggs)
        self.spans: dict = {}
        self._slots: list[torch.Tensor | None] = [None] * slots
        self._next_slot = 0

    def start_chunk(self, chunk: int, spans: dict) -> None:
        self.chunk, self.spans, self.parts = chunk, spans, [0] * len(self.aggs)

    def pack(self, batch: list) -> tuple[list[str], list[str], list[int], torch.Tensor]:
        """In the forward's thread: (accessions, sequences the pLM saw, lengths, representations)
        of ``batch`` ((accession, sequence, representation) per protein), the representations
        copied into the next of ``slots`` reusable buffers (mapped, see ``_state.state_empty``).

        Once packed, the forward's per-protein tensors can be freed before the next forward
        allocates: handed to the worker instead, they would stay alive between that forward's
        temporaries and raise the peak.  With one call in flight, the slot a batch is packed into
        was last read by the call two batches back, which ``Pipeline.submit`` has waited for."""
        lengths = [len(b[2]) for b in batch]
        n, d = sum(lengths), int(batch[0][2].shape[1])
        buf = self._slots[self._next_slot]
        if buf is None or buf.numel() < n * d or buf.dtype != batch[0][2].dtype:
            dtype = torch.empty(0, dtype=batch[0][2].dtype).numpy().dtype
            buf = torch.from_numpy(state_empty(n * d + n * d // 4, dtype))  # headroom: batches vary
            self._slots[self._next_slot] = buf
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        X = buf[: n * d].view(n, d)
        torch.cat([b[2] for b in batch], out=X)
        return [b[0] for b in batch], [b[1][:k] for b, k in zip(batch, lengths)], lengths, X

    def __call__(self, packed: tuple, members: list[int]) -> None:
        """``packed``: a batch from ``pack``; ``members``: the SAEs (indices) of its layer."""
        t = time.perf_counter()
        accs, seqs, lengths, X = packed
        X = X.to(self.device)
        lengths = torch.tensor(lengths)
        means, maxes = pooled_representations(X, lengths, self.aggs[members[0]].s.context_free)
        spans = [self.spans[a] for a in accs]
        self.timings["aggregate"] += time.perf_counter() - t
        ends = np.cumsum(lengths.numpy())
        keep = np.array([a in self.codes_for for a in accs], dtype=bool)
        for p0, p1 in _pieces(ends, SUB_ROWS):
            r0, r1 = int(ends[p0 - 1]) if p0 else 0, int(ends[p1 - 1])
            for j in members:
                te = time.perf_counter()
                rows, lat, val = sparse_encode(self.saes[j], X[r0:r1], self.encoders[j], scratch=self.scratches[j])
                ta = time.perf_counter()
                self.aggs[j].update(accs[p0:p1], seqs[p0:p1], rows, lat, val, mean_reps=means[p0:p1],
                                    max_reps=maxes[p0:p1], spans=spans[p0:p1],
                                    keep_codes=keep[p0:p1] if keep[p0:p1].any() else None)
                if self.aggs[j].pending_bytes >= SPILL_BYTES:
                    self.aggs[j].flush(spill_path(self.root, self.ids[j], self.chunk, self.parts[j]))
                    self.parts[j] += 1
                    release_free_heap()
                self.timings["sae_encode"] += ta - te
                self.timings["aggregate"] += time.perf_counter() - ta

    def end_chunk(self) -> None:
        for j, agg in enumerate(self.aggs):
            agg.flush(spill_path(self.root, self.ids[j], self.chunk, self.parts[j]))


def _own_threads(n: int) -> None:
    from ..threads import set_torch_threads

    set_torch_threads(n)


class Pipeline:
    """Runs calls on one worker thread, in order, at most ``in_flight`` submitted and unfinished.

    ``submit`` blocks while ``in_flight`` calls are unfinished and re-raises the first error of a
    finished call in the caller's thread; ``wait`` returns when all have finished (and raises
    likewise).  ``in_flight=0`` runs every call at once in the caller's thread (no worker): the
    serial build, for comparison and for debugging.  Leaving the ``with`` block on an error
    cancels the calls not yet started and waits for the running one, so no call touches the
    build's state once the error propagates."""

    def __init__(self, in_flight: int = 1) -> None:
        self.in_flight = in_flight
        # The worker sets its own torch threads: a forward beside it may change torch's default
        # for threads that start later (threads.torch_threads).
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plmscope-sae",
                                        initializer=_own_threads, initargs=(torch.get_num_threads(),)) if in_flight > 0 else None
        self._running: deque[Future] = deque()

    def submit(self, fn, *args) -> None:
        if self._pool is None:
            fn(*args)
            return
        while len(self._running) >= self.in_flight:
            self._running.popleft().result()
        self._running.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        while self._running:
            self._running.popleft().result()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._pool is None:
            return
        if exc_type is None:
            try:
                self.wait()
            finally:
                self._pool.shutdown(wait=True)
            return
        for f in self._running:
            f.cancel()
        self._running.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
