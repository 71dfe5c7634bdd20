"""Each latent's effect on the model's output: which amino acids it promotes and suppresses.

For a latent, on its ``examples`` strongest atlas examples: the latent is ablated (set to 0, error
term kept, ``intervene``) on every residue, the remaining layers and the head run, and at the
positions it reads out to (ESM-2: the residues where it is active; UniRep: the residue after each,
predicted from the state it is active in), the change of each of the 20 amino acids'
log-probabilities is averaged.  ``effect[a] = mean(log p_clean(a) - log p_ablated(a))``: positive,
the latent promotes ``a``; negative, it suppresses it.

Cost: one spliced forward per (latent, example) plus one clean forward per distinct example
protein, in length-sorted batches of ``token_budget`` tokens; an example longer than
``max_residues`` is cut to the ``max_residues`` residues around its strongest residue (ESM-2 then
loses the context outside the window; UniRep the prefix).
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


@torch.no_grad()
def output_effects(plm, sae, examples: Sequence[Example], settings: OutputEffectSettings = OutputEffectSettings(),
                   progress: Callable[[int], None] | None = None) -> OutputEffects:
    classes = aa_classes(plm)
    clean: dict[str, torch.Tensor] = {}
    uniq = {e.key: e.sequence for e in examples}
    for batch in token_batches(list(uniq.items()), settings.token_budget):
        for (key, _), out in zip(batch, plm.splice_forward([s for _, s in batch], sae.layer)):
            clean[key] = out.logprobs[:, classes]
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, list[int]] = {}
    items = [(str(i), e.sequence) for i, e in enumerate(examples)]
    for batch in token_batches(items, settings.token_budget):
        ex = [examples[int(i)] for i, _ in batch]
        ivs = [Intervention((Edit(e.latent, "ablate"),)) for e in ex]
        outs = plm.splice_forward([e.sequence for e in ex], sae.layer, make_splice(sae, ivs, [len(e.sequence) for e in ex]))
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
