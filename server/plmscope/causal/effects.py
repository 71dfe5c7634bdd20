"""What an intervention does to the model's own predictions on one sequence.

Per residue ``i``: the change in log-probability of the residue actually there (ESM-2: wild-type
marginals from one unmasked pass, or masked marginals, one pass per residue with it masked, on
request; UniRep: next-amino-acid, predicted from the state before the residue), the change of all
20 amino acids' log-probabilities (the heatmap), the total change in loss (nats, the negative sum of
the first), the residues whose most likely amino acid changes, and the steered sequence: the most
likely of the 20 amino acids at every residue under the intervention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..vocab import AMINO_ACIDS
from .intervene import Intervention, make_splice


@dataclass(frozen=True)
class EffectSettings:
    masked_marginals: bool = False  # ESM-2 only: one pass per residue with it masked
    token_budget: int = 8192  # padded tokens per forward batch (masked marginals)


@dataclass
class InterventionEffect:
    sequence: str
    marginals: str  # "wild-type", "masked" or "next-amino-acid"
    clean_logprob: np.ndarray  # (n,) log p(actual residue), no intervention
    intervened_logprob: np.ndarray  # (n,) the same under the intervention
    delta_aa: np.ndarray  # (n, 20) change of log p(a) for a in AMINO_ACIDS
    clean_top: str  # most likely of the 20 amino acids per residue, no intervention
    steered_sequence: str  # ... under the intervention

    @property
    def delta_logprob(self) -> np.ndarray:
        return self.intervened_logprob - self.clean_logprob

    @property
    def total_delta_loss(self) -> float:
        """Change of the summed loss over the sequence's residues, in nats (> 0: the model got worse)."""
        return float(-self.delta_logprob.sum())

    @property
    def mean_delta_loss(self) -> float:
        return self.total_delta_loss / max(len(self.sequence), 1)

    def changed_residues(self) -> list[dict]:
        return [{"position": i + 1, "residue": self.sequence[i], "clean_top": a, "steered_top": b}
                for i, (a, b) in enumerate(zip(self.clean_top, self.steered_sequence)) if a != b]


def aa_classes(plm) -> torch.Tensor:
    """The output class of each of the 20 amino acids, in ``AMINO_ACIDS`` order."""
    return torch.tensor([plm.target_class(a) for a in AMINO_ACIDS])


def _logprobs(plm, sae, seq: str, iv: Intervention, settings: EffectSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, n_classes) log-probabilities per residue without and with the intervention: the layers
    up to the SAE's are the same in both, so they run once (``ProteinLM.resume_forward``)."""
    n = len(seq)
    if not settings.masked_marginals:
        states = plm.layer_states([seq], sae.layer)
        return plm.resume_forward(states)[0].logprobs, plm.resume_forward(states, make_splice(sae, [iv], [n]))[0].logprobs
    if plm.family != "esm2":
        raise InputError(f"masked marginals need a masked language model (ESM-2); {plm.name} predicts the next amino acid")
    per_batch = max(1, settings.token_budget // (n + 2))
    clean, after = [], []
    for lo in range(0, n, per_batch):
        pos = list(range(lo, min(n, lo + per_batch)))
        states = plm.layer_states([seq] * len(pos), sae.layer, masked=[[p] for p in pos])
        clean += [o.logprobs[p] for o, p in zip(plm.resume_forward(states), pos)]
        outs = plm.resume_forward(states, make_splice(sae, [iv] * len(pos), [n] * len(pos)))
        after += [o.logprobs[p] for o, p in zip(outs, pos)]
    return torch.stack(clean), torch.stack(after)


def intervention_effect(plm, sae, seq: str, iv: Intervention, settings: EffectSettings = EffectSettings()) -> InterventionEffect:
    """The effect of ``iv`` on ``seq`` (see the module docstring)."""
    iv.check(sae.d_sae, len(seq))
    clean, after = _logprobs(plm, sae, seq, iv, settings)
    target = torch.tensor([plm.target_class(a) for a in seq])
    idx = torch.arange(len(seq))
    classes = aa_classes(plm)
    clean_aa, after_aa = clean[:, classes], after[:, classes]
    marginals = "next-amino-acid" if plm.family == "unirep" else ("masked" if settings.masked_marginals else "wild-type")
    return InterventionEffect(
        sequence=seq, marginals=marginals,
        clean_logprob=clean[idx, target].double().numpy(), intervened_logprob=after[idx, target].double().numpy(),
        delta_aa=(after_aa - clean_aa).double().numpy(),
        clean_top="".join(AMINO_ACIDS[i] for i in clean_aa.argmax(-1).tolist()),
        steered_sequence="".join(AMINO_ACIDS[i] for i in after_aa.argmax(-1).tolist()),
    )
