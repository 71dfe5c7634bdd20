"""The residue stream of ``train-sae``: the corpus through the pLM in a seeded order, epoch after
epoch, and a bounded shuffle buffer that draws SAE batches from it.

Everything here is deterministic given the seed and a ``Position``, so a run resumed from a
checkpoint sees exactly the residues an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..plm.base import ProteinLM, token_batches

SORT_WINDOW = 2048  # proteins per length-sorting window (as ProteinLM.iter_representations)


@dataclass
class Position:
    """Where the stream is: the next protein to push is #``protein`` of pLM batch ``batch`` of
    window ``window`` of epoch ``epoch`` (epoch order, windows and batches are deterministic)."""

    epoch: int = 0
    window: int = 0
    batch: int = 0
    protein: int = 0


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    # Independent generator per epoch so the order never depends on how far a run got.
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def iter_proteins_from(
    plm: ProteinLM, items: list[tuple[str, str]], layers: tuple[int, ...], seed: int, token_budget: int,
    start: Position
) -> Iterator[tuple[Position, torch.Tensor]]:
    """Yield (position after this protein, representation) from ``start`` on, forever (epochs).

    The representation holds ``layers``' representations side by side (one forward serves all)
    and leaves out the pLM's context-free positions: an SAE never trains on them."""
    cf = plm.context_free_positions
    epoch = start.epoch
    first = True
    while True:
        order = [items[i] for i in epoch_order(len(items), seed, epoch)]
        windows = [order[i : i + SORT_WINDOW] for i in range(0, len(order), SORT_WINDOW)]
        for w, window in enumerate(windows):
            if first and w < start.window:
                continue
            batches = token_batches(window, token_budget)
            for b, batch in enumerate(batches):
                if first and (w, b) < (start.window, start.batch):
                    continue
                skip = start.protein if first and (w, b) == (start.window, start.batch) else 0
                first = False
                per_layer = plm.layer_representations([s for _, s in batch], layers, [r for r, _ in batch])
                reps = [torch.cat(r, dim=1)[cf:] if len(layers) > 1 else r[0][cf:] for r in zip(*per_layer)]
                for p in range(skip, len(batch)):
                    nxt = Position(epoch, w, b, p + 1)
                    if p + 1 == len(batch):  # normalise "end of batch" to "start of next batch"
                        nxt = Position(epoch, w, b + 1, 0)
                        if b + 1 == len(batches):
                            nxt = Position(epoch, w + 1, 0, 0) if w + 1 < len(windows) else Position(epoch + 1)
                    yield nxt, reps[p]
        first = False
        epoch += 1


class ShuffleBuffer:
    """Fixed-capacity buffer of residue vectors; when full, a random half is drawn out as batches."""

    def __init__(self, capacity: int, d: int, batch_size: int, generator: torch.Generator):
        self.data = torch.empty(capacity, d)
        self.n = 0
        self.batch_size = batch_size
        self.g = generator
        # draw a whole number of batches each time so no partial batch is left over
        self.draw_rows = max((capacity // 2) // batch_size, 1) * batch_size

    def push(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Add rows; returns the batches drawn while doing so (possibly none)."""
        out: list[torch.Tensor] = []
        i = 0
        while i < rows.shape[0]:
            take = min(rows.shape[0] - i, self.data.shape[0] - self.n)
            self.data[self.n : self.n + take] = rows[i : i + take]
            self.n += take
            i += take
            if self.n == self.data.shape[0]:
                out += self.draw(self.draw_rows)
        return out

    def draw(self, rows: int) -> list[torch.Tensor]:
        perm = torch.randperm(self.n, generator=self.g)
        drawn = self.data[perm[:rows]].clone()
        keep = perm[rows:]
        self.data[: keep.numel()] = self.data[keep].clone()
        self.n = keep.numel()
        return list(drawn.split(self.batch_size))
