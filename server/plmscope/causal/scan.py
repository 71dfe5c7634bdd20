"""In-silico saturation mutagenesis of SAE latent activations.

For a sequence, every single substitution by another of the 20 amino acids at residues
``start..end`` (19 per residue when the wild type is standard), and per chosen latent its
activation at the mutated residue (``site``) and its maximum over the whole variant (``max``),
next to the wild type's.  Where the model scores variants itself, ``score`` is

* ESM-2: the masked-marginal log-ratio of Meier et al. 2021, log p(mut) - log p(wt) with the residue
  masked (one masked pass per residue, shared by its 19 variants);
* UniRep: the change in the sequence's log-likelihood, sum_i log p(x_i | x_<i), variant - wild type.

``scan`` runs variants in batches of equal length (no padding; ``token_budget`` padded tokens each);
ESM-2's representations stop at the SAE's layer unless the score needs the head.
``scan_brute_force`` is the reference: one forward per variant (and, for ESM-2's score, one masked
pass per variant); ``tests/causal/test_scan.py`` holds ``scan`` to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..vocab import AMINO_ACIDS


@dataclass(frozen=True)
class ScanSettings:
    start: int | None = None  # 1-based first mutated residue; None: residue 1
    end: int | None = None  # 1-based last mutated residue (inclusive); None: the last
    token_budget: int = 8192  # padded tokens per forward batch
    score: bool = True  # also the model's own variant score

    def __post_init__(self) -> None:
        if self.start is not None and self.start < 1:
            raise InputError(f"scan start {self.start} must be at least 1 (residues count from 1)")
        if self.start is not None and self.end is not None and self.end < self.start:
            raise InputError(f"scan end {self.end} lies before its start {self.start}")
        if self.token_budget < 1:
            raise InputError(f"token budget must be at least 1, got {self.token_budget}")

    def window(self, length: int) -> range:
        """0-based residues mutated in a sequence of ``length``."""
        start = (self.start or 1) - 1
        if start >= length:
            raise InputError(f"scan start {self.start} is beyond the sequence's {length} residues")
        return range(start, min(self.end or length, length))


@dataclass
class ScanResult:
    sequence: str
    latents: list[int]
    position: np.ndarray  # (V,) 1-based mutated residue per variant
    mutant: list[str]  # (V,) the substituted amino acid
    site: np.ndarray  # (V, K) activation of each latent at the mutated residue
    max: np.ndarray  # (V, K) maximum over the variant's residues
    wild_type: np.ndarray  # (n, K) the wild type's activations
    score: np.ndarray | None  # (V,) the model's variant score, or None
    score_name: str | None

    @property
    def n_variants(self) -> int:
        return len(self.mutant)

    def rows(self, record: str = "") -> Iterator[dict]:
        """One row per (variant, latent): the long table ``plmscope scan`` writes."""
        wt_max = self.wild_type.max(axis=0) if len(self.wild_type) else np.zeros(len(self.latents))
        for v in range(self.n_variants):
            p = int(self.position[v])
            for k, lat in enumerate(self.latents):
                yield {"record": record, "position": p, "wild_type": self.sequence[p - 1], "mutant": self.mutant[v],
                       "latent": lat, "site_act": float(self.site[v, k]), "wt_site_act": float(self.wild_type[p - 1, k]),
                       "max_act": float(self.max[v, k]), "wt_max_act": float(wt_max[k]),
                       "score": None if self.score is None else float(self.score[v])}

    def grid(self, latent: int, kind: str = "site") -> tuple[list[int], np.ndarray]:
        """(positions, (20, W) change from the wild type) for a heatmap: rows AMINO_ACIDS, the
        wild type's own cell 0."""
        k = self.latents.index(latent)
        positions = sorted(set(int(p) for p in self.position))
        col = {p: j for j, p in enumerate(positions)}
        out = np.zeros((len(AMINO_ACIDS), len(positions)))
        values = self.site[:, k] if kind == "site" else self.max[:, k]
        wt_max = float(self.wild_type[:, k].max()) if len(self.wild_type) else 0.0
        for v in range(self.n_variants):
            p = int(self.position[v])
            base = float(self.wild_type[p - 1, k]) if kind == "site" else wt_max
            out[AMINO_ACIDS.index(self.mutant[v]), col[p]] = float(values[v]) - base
        return positions, out

    def score_grid(self) -> tuple[list[int], np.ndarray | None]:
        positions = sorted(set(int(p) for p in self.position))
        if self.score is None:
            return positions, None
        col = {p: j for j, p in enumerate(positions)}
        out = np.zeros((len(AMINO_ACIDS), len(positions)))
        for v in range(self.n_variants):
            out[AMINO_ACIDS.index(self.mutant[v]), col[int(self.position[v])]] = float(self.score[v])
        return positions, out


def variants(seq: str, window: range) -> list[tuple[int, str]]:
    """(0-based residue, substituted amino acid) for every single substitution in ``window``."""
    return [(p, a) for p in window for a in AMINO_ACIDS if a != seq[p]]


def mutate(seq: str, p: int, a: str) -> str:
    return seq[:p] + a + seq[p + 1 :]


def score_name(plm) -> str:
    return "masked_marginal_log_ratio" if plm.family == "esm2" else "delta_log_likelihood"


def _check(plm, sae, seq: str, latents: Sequence[int]) -> list[int]:
    if not seq:
        raise InputError("the sequence to scan is empty")
    plm.check_length([seq])
    latents = list(dict.fromkeys(int(x) for x in latents))
    if not latents:
        raise InputError("name at least one latent to scan")
    bad = [x for x in latents if not 0 <= x < sae.d_sae]
    if bad:
        raise InputError(f"latent {bad[0]} does not exist: the SAE has latents 0..{sae.d_sae - 1}")
    return latents


def _latents_of(sae, reps: list[torch.Tensor], latents: list[int]) -> list[torch.Tensor]:
    """Per representation, (n, K) activations of ``latents`` (one encode for the whole batch)."""
    lengths = [r.shape[0] for r in reps]
    z = sae.encode(torch.cat(reps).to(sae.W_dec.device))[:, latents].float().cpu()
    return list(torch.split(z, lengths))


def _loglik(plm, out, seq: str) -> float:
    target = torch.tensor([plm.target_class(a) for a in seq])
    return float(out.logprobs[torch.arange(len(seq)), target].double().sum())


def _result(plm, seq, latents, var, wt_z, zs, scores) -> ScanResult:
    return ScanResult(
        sequence=seq, latents=latents, position=np.array([p + 1 for p, _ in var], dtype=np.int64),
        mutant=[a for _, a in var],
        site=np.array([z[p].numpy() for (p, _), z in zip(var, zs)]).reshape(len(var), len(latents)),
        max=np.array([z.max(0).values.numpy() for z in zs]).reshape(len(var), len(latents)),
        wild_type=wt_z.numpy().astype(np.float64), score=None if scores is None else np.asarray(scores, dtype=np.float64),
        score_name=score_name(plm) if scores is not None else None,
    )


@torch.no_grad()
def scan(plm, sae, seq: str, latents: Sequence[int], settings: ScanSettings = ScanSettings(), progress=None) -> ScanResult:
    """Every single substitution in the window, batched (see the module docstring).  ``progress``:
    called with the number of variants finished after each batch."""
    latents = _check(plm, sae, seq, latents)
    n, layer = len(seq), sae.layer
    window = settings.window(n)
    var = variants(seq, window)
    per_batch = max(1, settings.token_budget // (n + 2))
    unirep_score = settings.score and plm.family == "unirep"
    wt_out = plm.splice_forward([seq], layer, return_layer=True)[0]
    wt_z = _latents_of(sae, [wt_out.layer], latents)[0]
    wt_ll = _loglik(plm, wt_out, seq) if unirep_score else None
    zs: list[torch.Tensor] = []
    scores: list[float] | None = [] if settings.score else None
    for lo in range(0, len(var), per_batch):
        chunk = var[lo : lo + per_batch]
        seqs = [mutate(seq, p, a) for p, a in chunk]
        if unirep_score:
            outs = plm.splice_forward(seqs, layer, return_layer=True)
            reps = [o.layer for o in outs]
            scores += [_loglik(plm, o, s) - wt_ll for o, s in zip(outs, seqs)]
        else:
            reps = plm.representations(seqs, layer)
        zs += _latents_of(sae, reps, latents)
        if progress is not None:
            progress(len(chunk))
    if settings.score and plm.family == "esm2":
        classes = {a: plm.target_class(a) for a in AMINO_ACIDS}
        masked_lp: dict[int, torch.Tensor] = {}
        positions = list(window)
        for lo in range(0, len(positions), per_batch):
            pos = positions[lo : lo + per_batch]
            for p, o in zip(pos, plm.splice_forward([seq] * len(pos), layer, masked=[[p] for p in pos])):
                masked_lp[p] = o.logprobs[p]
        scores = [float(masked_lp[p][classes[a]] - masked_lp[p][plm.target_class(seq[p])]) for p, a in var]
    return _result(plm, seq, latents, var, wt_z, zs, scores)


@torch.no_grad()
def scan_brute_force(plm, sae, seq: str, latents: Sequence[int], settings: ScanSettings = ScanSettings()) -> ScanResult:
    """The reference path: one forward per variant (the test and the benchmark compare ``scan`` to it)."""
    latents = _check(plm, sae, seq, latents)
    layer = sae.layer
    var = variants(seq, settings.window(len(seq)))
    wt_out = plm.splice_forward([seq], layer, return_layer=True)[0]
    wt_z = _latents_of(sae, [wt_out.layer], latents)[0]
    zs, scores = [], [] if settings.score else None
    for p, a in var:
        s = mutate(seq, p, a)
        out = plm.splice_forward([s], layer, return_layer=True)[0]
        zs += _latents_of(sae, [out.layer], latents)
        if settings.score and plm.family == "unirep":
            scores.append(_loglik(plm, out, s) - _loglik(plm, wt_out, seq))
        elif settings.score:
            lp = plm.splice_forward([seq], layer, masked=[[p]])[0].logprobs[p]
            scores.append(float(lp[plm.target_class(a)] - lp[plm.target_class(seq[p])]))
    return _result(plm, seq, latents, var, wt_z, zs, scores)
