"""Effects of an intervention on the model's own predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plmscope.causal.effects import EffectSettings, intervention_effect
from plmscope.causal.intervene import Edit, Intervention, make_splice
from plmscope.errors import InputError
from plmscope.vocab import AMINO_ACIDS

from .conftest import SEQ


def test_effect_of_clamping_a_latent(pair):
    plm, sae = pair
    iv = Intervention((Edit(11, "clamp", 8.0),), start=10, end=20)
    eff = intervention_effect(plm, sae, SEQ, iv)
    clean = plm.splice_forward([SEQ], sae.layer)[0].logprobs
    target = [plm.target_class(a) for a in SEQ]
    np.testing.assert_allclose(eff.clean_logprob, clean[torch.arange(len(SEQ)), target].numpy(), atol=1e-6)
    # the clean pass's layer state, resumed with the splice: as a whole spliced pass
    after = plm.splice_forward([SEQ], sae.layer, make_splice(sae, [iv], [len(SEQ)]))[0].logprobs
    np.testing.assert_allclose(eff.intervened_logprob, after[torch.arange(len(SEQ)), target].numpy(), atol=1e-6)
    assert eff.total_delta_loss == pytest.approx(-(eff.intervened_logprob - eff.clean_logprob).sum())
    assert len(eff.steered_sequence) == len(SEQ) and set(eff.steered_sequence) <= set(AMINO_ACIDS)
    assert eff.delta_aa.shape == (len(SEQ), 20)
    # residues before the edited range cannot be touched by a left-to-right model
    if plm.family == "unirep":
        assert np.all(eff.delta_logprob[:10] == 0) and np.abs(eff.delta_logprob[10:]).max() > 0
        assert eff.marginals == "next-amino-acid"
    else:
        assert np.abs(eff.delta_logprob).max() > 0
    for row in eff.changed_residues():
        assert row["clean_top"] != row["steered_top"]


def test_masked_marginals(esm_pair, unirep_pair):
    plm, sae = esm_pair
    seq = SEQ[:12]
    eff = intervention_effect(plm, sae, seq, Intervention((Edit(2, "ablate"),)), EffectSettings(masked_marginals=True, token_budget=40))
    assert eff.marginals == "masked"
    p = 5
    lp = plm.splice_forward([seq], sae.layer, masked=[[p]])[0].logprobs[p]
    assert eff.clean_logprob[p] == pytest.approx(float(lp[plm.target_class(seq[p])]), abs=1e-6)
    iv = Intervention((Edit(2, "ablate"),))
    lp = plm.splice_forward([seq], sae.layer, make_splice(sae, [iv], [len(seq)]), masked=[[p]])[0].logprobs[p]
    assert eff.intervened_logprob[p] == pytest.approx(float(lp[plm.target_class(seq[p])]), abs=1e-6)
    u, usae = unirep_pair
    with pytest.raises(InputError, match="ESM-2"):
        intervention_effect(u, usae, seq, Intervention((Edit(2, "ablate"),)), EffectSettings(masked_marginals=True))
