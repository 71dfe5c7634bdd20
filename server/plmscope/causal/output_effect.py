"""Each latent's effect on the model's output: which amino acids it promotes and suppresses.

For a latent, on its ``examples`` strongest atlas examples: the latent is ablated (set to 0, error
term kept, ``intervene``) on every residue, the remaining layers and the head run, and at the
positions it reads out to (ESM-2: the residues where it is active; UniRep: the residue after each,
predicted from the state it is active in), the change of each of the 20 amino acids'
log-probabilities is averaged.  ``effect[a] = mean(log p_clean(a) - log p_ablated(a))``: positive,
the latent promotes ``a``; negative, it suppresses it.

Cost: one clean pass per distinct example protein through every layer and the head, and per
(latent, example) only the layers above the SAE's and the head: the ablation resumes from the
clean pass's layer state (``ProteinLM.layer_states`` / ``resume_forward``), whose layers up to
the SAE's are identical in both.  UniRep reads left to right, so both passes stop at the residue
after the last active one (nothing later is read out).  Batches are length-sorted, of
``token_budget`` padded tokens; the clean states of at most ``state_tokens`` tokens are held at
once.  An example longer than ``max_residues`` is cut to the ``max_residues`` residues around its
strongest residue (ESM-2 then loses the context outside the window; UniRep the prefix).
``scripts/bench_output_effects.py`` times this against full forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..plm.base import token_batches
from .effects import aa_classes
from .intervene import Edit, Intervention, make_splice


@dataclass(frozen=True)
class OutputEffectSettings:
    examples: int = 3  # top examples per latent
    max_residues: int = 256  # longest window of an example
    token_budget: int = 8192
    state_tokens: int = 65536  # clean layer-state token rows held at once (memory: times d_model floats)


@dataclass(frozen=True)
class Example:
    latent: int
    key: str  # identifies the protein (and window) for the clean-pass cache
    sequence: str
    active: np.ndarray  # 0-based residues where the latent is active


@dataclass
class OutputEffects:
    latents: np.ndarray  # (m,) latents with at least one read-out position
    effect: np.ndarray  # (m, 20) mean log p_clean - log p_ablated, AMINO_ACIDS order
    n_examples: np.ndarray  # (m,)
    n_positions: np.ndarray  # (m,)


def window(seq: str, acts: np.ndarray, max_residues: int) -> tuple[int, int]:
    """[lo, hi) of at most ``max_residues`` residues around the strongest activation."""
    n = len(seq)
    if n <= max_residues:
        return 0, n
    centre = int(np.argmax(acts))
    lo = min(max(centre - max_residues // 2, 0), n - max_residues)
    return lo, lo + max_residues


def make_example(latent: int, accession: str, seq: str, acts: np.ndarray, max_residues: int) -> Example | None:
    acts = np.asarray(acts)[: len(seq)]
    seq = seq[: len(acts)]
    lo, hi = window(seq, acts, max_residues)
    active = np.flatnonzero(acts[lo:hi] > 0)
    if not len(active):
        return None
    return Example(latent, f"{accession}:{lo}", seq[lo:hi], active)


def readout(family: str, active: np.ndarray, n: int) -> np.ndarray:
    """Rows of ``splice_forward``'s log-probabilities where an edit at ``active`` first shows."""
    if family == "unirep":
        shifted = active + 1
        return shifted[shifted < n]
    return active


def residues_needed(family: str, active: np.ndarray, n: int) -> int:
    """How many leading residues of an ``n``-residue example the passes must run for ``readout``:
    UniRep's row ``a + 1`` depends on residues up to ``a`` only (its row ``n'`` after ``n'``
    residues would be the stop prediction, so one more is run); ESM-2 attends both ways."""
    if family == "unirep":
        return min(n, int(active.max()) + 2)
    return n


def _state_windows(keys: list[str], lengths: dict[str, int], state_tokens: int) -> list[list[str]]:
    """``keys`` by length, cut into runs of at most ``state_tokens`` tokens (BOS/EOS counted)."""
    windows: list[list[str]] = []
    current: list[str] = []
    held = 0
    for key in sorted(keys, key=lambda k: lengths[k]):
        if current and held + lengths[key] + 2 > state_tokens:
            windows.append(current)
            current, held = [], 0
        current.append(key)
        held += lengths[key] + 2
    if current:
        windows.append(current)
    return windows


@torch.no_grad()
def output_effects(plm, sae, examples: Sequence[Example], settings: OutputEffectSettings = OutputEffectSettings(),
                   progress: Callable[[int], None] | None = None) -> OutputEffects:
    classes = aa_classes(plm)
    run: dict[str, int] = {}  # key -> leading residues its passes run (the most any of its latents needs)
    by_key: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        run[e.key] = max(run.get(e.key, 0), residues_needed(plm.family, e.active, len(e.sequence)))
        by_key.setdefault(e.key, []).append(i)
    seqs = {e.key: e.sequence[: run[e.key]] for e in examples}
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, list[int]] = {}
    for keys in _state_windows(list(by_key), run, settings.state_tokens):
        states, clean = {}, {}
        for batch in token_batches([(k, seqs[k]) for k in keys], settings.token_budget):
            st = plm.layer_states([s for _, s in batch], sae.layer)
            for (key, _), state, out in zip(batch, st, plm.resume_forward(st)):
                states[key], clean[key] = state, out.logprobs[:, classes]
        items = [(str(i), seqs[k]) for k in keys for i in by_key[k]]
        for batch in token_batches(items, settings.token_budget):
            ex = [examples[int(i)] for i, _ in batch]
            ivs = [Intervention((Edit(e.latent, "ablate"),)) for e in ex]
            outs = plm.resume_forward([states[e.key] for e in ex], make_splice(sae, ivs, [run[e.key] for e in ex]))
            for e, out in zip(ex, outs):
                rows = torch.as_tensor(readout(plm.family, e.active, len(e.sequence)), dtype=torch.long)
                c = counts.setdefault(e.latent, [0, 0])
                c[0] += 1
                if len(rows):
                    d = (clean[e.key][rows] - out.logprobs[:, classes][rows]).double().sum(0).numpy()
                    sums[e.latent] = sums.get(e.latent, 0.0) + d
                    c[1] += len(rows)
            if progress is not None:
                progress(len(ex))
    lat = np.array(sorted(k for k in sums if counts[k][1] > 0), dtype=np.int64)
    return OutputEffects(
        latents=lat,
        effect=np.array([sums[k] / counts[k][1] for k in lat]).reshape(len(lat), len(classes)),
        n_examples=np.array([counts[k][0] for k in lat], dtype=np.int64),
        n_positions=np.array([counts[k][1] for k in lat], dtype=np.int64),
    )


def promoted(effect: Sequence[float], n: int = 3) -> tuple[list[dict], list[dict]]:
    """(promoted, suppressed): the ``n`` amino acids with the largest positive / negative effect."""
    from ..vocab import AMINO_ACIDS

    e = np.asarray(effect, dtype=float)
    order = np.argsort(-e, kind="stable")
    up = [{"aa": AMINO_ACIDS[i], "effect": round(float(e[i]), 4)} for i in order[:n] if e[i] > 0]
    down = [{"aa": AMINO_ACIDS[i], "effect": round(float(e[i]), 4)} for i in order[::-1][:n] if e[i] < 0]
    return up, down
