"""Interventions are exact: a no-op reproduces the model's own logits, a never-firing latent's
ablation changes nothing, steering adds exactly the decoder row, and the later layers really run."""

from __future__ import annotations

import copy

import pytest
import torch

from plmscope.causal.intervene import Edit, Intervention, make_splice
from plmscope.errors import InputError

from .conftest import SEQ


def _own_logprobs(plm, seq: str) -> torch.Tensor:
    """The model's log-probabilities from its own, independent forward (fair-esm's ESM2.forward;
    UniRep's ``logits``), rows as ``splice_forward``'s."""
    if plm.family == "esm2":
        _, _, tokens = plm.batch_converter([("", seq)])
        logits = plm.model(tokens)["logits"][0, 1 : len(seq) + 1]
    else:
        logits = plm.logits([seq])[0]
    return torch.log_softmax(logits.float(), -1)


def _run(plm, sae, seq, iv, **kw):
    return plm.splice_forward([seq], sae.layer, make_splice(sae, [iv], [len(seq)]), **kw)[0]


def test_no_op_reproduces_clean_logits(pair):
    plm, sae = pair
    z = sae.encode(plm.representations([SEQ], sae.layer)[0])
    live = int(z.sum(0).argmax())
    # clamping a latent to the value it already has, on the one residue where it is largest
    pos = int(z[:, live].argmax())
    noop = Intervention((Edit(live, "clamp", float(z[pos, live])),), start=pos + 1, end=pos + 1)
    out = _run(plm, sae, SEQ, noop).logprobs
    # exactly the unspliced pass, and the model's own forward to 1e-5 (+ float32 rounding relative
    # to the random tiny ESM-2's log-probabilities of up to ~40 nats: fused vs fair-esm attention)
    assert torch.equal(out, plm.splice_forward([SEQ], sae.layer)[0].logprobs)
    assert torch.allclose(out, _own_logprobs(plm, SEQ), atol=1e-5, rtol=1e-6)


def test_ablating_a_latent_that_never_fires_changes_nothing(pair):
    plm, sae = pair
    z = sae.encode(plm.representations([SEQ], sae.layer)[0])
    silent = int(torch.nonzero(z.max(0).values == 0)[0])
    live = int(z.sum(0).argmax())
    clean = plm.splice_forward([SEQ], sae.layer)[0].logprobs
    assert torch.equal(_run(plm, sae, SEQ, Intervention((Edit(silent, "ablate"),))).logprobs, clean)
    # and ablating one that fires does change the prediction (the check can fail)
    assert not torch.allclose(_run(plm, sae, SEQ, Intervention((Edit(live, "ablate"),))).logprobs, clean, atol=1e-4)


def test_steering_adds_exactly_the_decoder_row(pair):
    plm, sae = pair
    x = plm.representations([SEQ], sae.layer)[0]
    z = sae.encode(x)
    lat, start, end = 5, 3, 9
    iv = Intervention((Edit(lat, "steer", 2.0),), start=start, end=end, corpus_max={lat: 1.5})
    after = _run(plm, sae, SEQ, iv, return_layer=True).layer
    added = torch.zeros_like(z[:, lat])
    added[start - 1 : end] = 3.0 - z[start - 1 : end, lat]
    expected = added[:, None] * sae.W_dec[lat][None, :]
    assert torch.allclose(after - x, expected, atol=1e-5, rtol=0)
    assert torch.equal((after - x)[end:], torch.zeros_like(x[end:]))


def _altered_last_layer(plm):
    other = copy.copy(plm)
    if plm.family == "esm2":
        other.model = copy.deepcopy(plm.model)
        with torch.no_grad():
            other.model.layers[-1].fc2.weight.mul_(1.5)  # (a constant bias shift would vanish in the final layer norm)
    else:
        other.layers = copy.deepcopy(plm.layers)
        other.layers[-1].b.add_(0.5)
    return other


def test_the_remaining_layers_are_really_run(pair):
    plm, sae = pair
    assert sae.layer < plm.num_layers
    other = _altered_last_layer(plm)
    iv = Intervention((Edit(3, "clamp", 2.0),))
    a, b = _run(plm, sae, SEQ, iv, return_layer=True), _run(other, sae, SEQ, iv, return_layer=True)
    assert torch.equal(a.layer, b.layer)  # same input to the later layers...
    assert not torch.allclose(a.logprobs, b.logprobs, atol=1e-3)  # ...which were run


def test_batch_of_interventions_matches_one_at_a_time(pair):
    plm, sae = pair
    seqs = [SEQ, SEQ[5:30]]
    ivs = [Intervention((Edit(7, "clamp", 4.0),)), Intervention((Edit(9, "ablate"),), start=2, end=6)]
    together = plm.splice_forward(seqs, sae.layer, make_splice(sae, ivs, [len(s) for s in seqs]))
    for s, iv, out in zip(seqs, ivs, together):
        assert torch.allclose(out.logprobs, _run(plm, sae, s, iv).logprobs, atol=1e-5)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"edits": (Edit(1, "steer", 1.0),)}, "no corpus maximum"),
    ({"edits": (), "start": 0}, "at least 1"),
    ({"edits": (), "start": 5, "end": 2}, "before its start"),
])
def test_bad_interventions_say_what(kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        Intervention(**kwargs)


def test_bad_edits_say_what():
    with pytest.raises(InputError, match="outside 0..5"):
        Edit(1, "steer", 9.0)
    with pytest.raises(InputError, match="unknown"):
        Edit(1, "boost", 1.0)


def test_latent_outside_the_sae(esm_pair):
    plm, sae = esm_pair
    with pytest.raises(InputError, match="latents 0..127"):
        Intervention((Edit(500, "ablate"),)).check(sae.d_sae, len(SEQ))
