"""Interventions on SAE latents at the SAE's layer.

An intervention replaces the layer's residue rows ``x`` by ``decode(z') + (x - decode(z))``: the
SAE's reconstruction error is kept, so an intervention that leaves ``z`` unchanged changes nothing,
and what changes is exactly ``decode(z') - decode(z) = (z' - z) W_dec`` (times the SAE's scale).
It is computed in that form, ``x + (z' - z) W_dec``, because rounding then cannot turn a no-op
into a change: the added term is exactly zero where ``z' == z``.

``z'`` is ``z`` with each chosen latent

* ``ablate``: set to 0;
* ``clamp``: set to ``value``;
* ``steer``: set to ``value`` times the latent's maximum over the atlas corpus (InterProt's 0-5x),

on every residue or on residues ``start..end`` (1-based, inclusive).  The remaining layers and the
model's head then run on the result (``ProteinLM.splice_forward``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..errors import InputError

MODES = ("ablate", "clamp", "steer")
STEER_MAX = 5.0  # InterProt's steering range is 0..5x the latent's maximum


@dataclass(frozen=True)
class Edit:
    latent: int
    mode: str = "ablate"
    value: float = 0.0  # clamp: the activation; steer: multiple of the corpus maximum; ablate: unused

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"intervention mode {self.mode!r} is unknown: use one of {', '.join(MODES)}")
        if self.latent < 0:
            raise InputError(f"latent {self.latent} is negative")
        if self.mode == "steer" and not 0.0 <= self.value <= STEER_MAX:
            raise InputError(f"steering multiple {self.value} is outside 0..{STEER_MAX:g} (times the latent's corpus maximum)")
        if self.mode == "clamp" and not self.value >= 0.0:
            raise InputError(f"clamp value {self.value} must be a non-negative activation")


@dataclass(frozen=True)
class Intervention:
    edits: tuple[Edit, ...]
    start: int | None = None  # 1-based first residue edited; None: from residue 1
    end: int | None = None  # 1-based last residue edited (inclusive); None: to the last residue
    corpus_max: Mapping[int, float] = field(default_factory=dict)  # latent -> atlas maximum (steer needs it)

    def __post_init__(self) -> None:
        object.__setattr__(self, "edits", tuple(self.edits))
        if self.start is not None and self.start < 1:
            raise InputError(f"intervention start {self.start} must be at least 1 (residues count from 1)")
        if self.start is not None and self.end is not None and self.end < self.start:
            raise InputError(f"intervention end {self.end} lies before its start {self.start}")
        for e in self.edits:
            if e.mode == "steer" and not self.corpus_max.get(e.latent):
                raise InputError(f"latent {e.latent} has no corpus maximum, so it cannot be steered; clamp it to a value instead")

    def check(self, d_sae: int, length: int) -> None:
        """InputError naming what does not fit an SAE of ``d_sae`` latents and a sequence of ``length``."""
        for e in self.edits:
            if e.latent >= d_sae:
                raise InputError(f"latent {e.latent} does not exist: the SAE has latents 0..{d_sae - 1}")
        if self.start is not None and self.start > length:
            raise InputError(f"intervention start {self.start} is beyond the sequence's {length} residues")

    def rows(self, length: int) -> slice:
        """0-based residue rows edited in a sequence of ``length`` residues."""
        return slice((self.start or 1) - 1, min(self.end or length, length))

    def target(self, edit: Edit) -> float:
        if edit.mode == "ablate":
            return 0.0
        if edit.mode == "clamp":
            return float(edit.value)
        return float(edit.value) * float(self.corpus_max[edit.latent])


def edited_latents(sae, z: torch.Tensor, intervention: Intervention, length: int) -> torch.Tensor:
    """``z'`` for one sequence's (length, d_sae) latents."""
    z2 = z.clone()
    rows = intervention.rows(length)
    for e in intervention.edits:
        z2[rows, e.latent] = intervention.target(e)
    return z2


def intervene_rows(sae, x: torch.Tensor, intervention: Intervention) -> torch.Tensor:
    """The layer rows of one sequence after the intervention (see the module docstring)."""
    z = sae.encode(x)
    z2 = edited_latents(sae, z, intervention, x.shape[0])
    return x + ((z2 - z) @ sae.W_dec) * sae.norm_scale


def make_splice(sae, interventions: Sequence[Intervention | None], lengths: Sequence[int]):
    """A splice (all rows of a batch at once, in input order) applying ``interventions[b]`` to
    sequence ``b`` (None: untouched)."""

    def splice(rows: torch.Tensor) -> torch.Tensor:
        out, offset = [], 0
        x_all = rows.to(sae.W_dec.device, sae.W_dec.dtype)
        for iv, n in zip(interventions, lengths):
            x = x_all[offset : offset + n]
            out.append(x if iv is None else intervene_rows(sae, x, iv))
            offset += n
        return torch.cat(out).to(rows)

    return splice
