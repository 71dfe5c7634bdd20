"""ESM-2 backend against fair-esm itself, on a tiny random ESM-2 saved in the official format."""

from __future__ import annotations

import argparse
import logging
import pickle
import shutil

import esm
import pytest
import torch
import torch.nn.functional as F
from esm.pretrained import load_model_and_alphabet_core

from plmscope.errors import ModelError
from plmscope.plm import esm2 as esm2_mod
from plmscope.plm.base import cpu_native_bf16, load_plm
from plmscope.plm.esm2 import ESM2, mask_positions, regression_path, save_random_esm2
from plmscope.vocab import AMINO_ACIDS, NONSTANDARD_AA

N_LAYERS = 3
SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "MKV", AMINO_ACIDS + NONSTANDARD_AA, "GGSGGSGGSGGSLLLLKKK", "W"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_random_esm2(
        tmp_path_factory.mktemp("esm") / "tiny_esm2.pt", None, num_layers=N_LAYERS, embed_dim=32, attention_heads=4, seed=3
    )


@pytest.fixture(scope="module")
def plm(ckpt):
    return ESM2.load(str(ckpt), "cpu")


@pytest.fixture(scope="module")
def reference(ckpt):
    """fair-esm's own model built from the same files, independent of our loader (trusted file)."""
    model_data = torch.load(ckpt, map_location="cpu", weights_only=False)
    regression = torch.load(regression_path(ckpt), map_location="cpu", weights_only=False)
    model, alphabet = load_model_and_alphabet_core("esm2_tiny", model_data, regression)
    return model.eval(), alphabet


def test_plain_fair_esm_fails_on_official_file_and_ours_loads(ckpt, plm, reference):
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        esm.pretrained.load_model_and_alphabet_local(str(ckpt))
    ref_state = reference[0].state_dict()
    ours = plm.model.state_dict()
    assert ours.keys() == ref_state.keys()
    assert all(torch.equal(ours[k], ref_state[k]) for k in ours)
    assert plm.num_layers == N_LAYERS and plm.d_model(2) == 32 and plm.max_residues == 1022


def test_saved_file_has_official_layout(ckpt):
    data = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert isinstance(data["cfg"]["model"], argparse.Namespace)
    assert data["cfg"]["model"].encoder_layers == N_LAYERS
    keys = set(data["model"])
    assert "encoder.sentence_encoder.embed_tokens.weight" in keys
    assert "encoder.sentence_encoder.emb_layer_norm_after.weight" in keys
    assert "encoder.sentence_encoder.layers.2.self_attn.rot_emb.inv_freq" in keys
    assert "encoder.lm_head.dense.weight" in keys
    assert all(k.startswith(("encoder.sentence_encoder.", "encoder.lm_head.")) for k in keys)
    regression = torch.load(regression_path(ckpt), map_location="cpu", weights_only=True)
    assert set(regression["model"]) == {"contact_head.regression.weight", "contact_head.regression.bias"}


@pytest.mark.parametrize("layer", range(N_LAYERS + 1))
def test_equals_fair_esm_every_layer_padded_batches(plm, reference, layer):
    model, alphabet = reference
    _, _, tokens = alphabet.get_batch_converter()([("", s) for s in SEQS])
    with torch.no_grad():
        ref = model(tokens, repr_layers=[layer])["representations"][layer]
    batched = plm.representations(SEQS, layer)
    streamed = {rid: rep for rid, _, rep in plm.iter_representations(enumerate(SEQS), layer, token_budget=40)}
    for b, seq in enumerate(SEQS):
        expected = ref[b, 1 : len(seq) + 1]
        assert batched[b].shape == (len(seq), 32) and batched[b].dtype == torch.float32
        torch.testing.assert_close(batched[b], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(streamed[b], expected, atol=1e-5, rtol=0)


def test_several_layers_from_one_forward_equal_fair_esm(plm, reference):
    model, alphabet = reference
    _, _, tokens = alphabet.get_batch_converter()([("", s) for s in SEQS])
    layers = [N_LAYERS, 0, 2]  # any order; the results come back in the order asked
    with torch.no_grad():
        ref = model(tokens, repr_layers=layers)["representations"]
    several = plm.layer_representations(SEQS, layers)
    streamed = {rid: reps for rid, _, reps in plm.iter_layer_representations(enumerate(SEQS), layers, token_budget=40)}
    for j, layer in enumerate(layers):
        for b, seq in enumerate(SEQS):
            torch.testing.assert_close(several[j][b], ref[layer][b, 1 : len(seq) + 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(streamed[b][j], ref[layer][b, 1 : len(seq) + 1], atol=1e-5, rtol=0)
    assert plm.context_free_positions == 0  # a bidirectional model: every position sees the protein


def test_early_stop_skips_later_layers(plm):
    calls = []
    hooks = [layer.fc2.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, layer in enumerate(plm.model.layers)]
    hooks.append(plm.model.emb_layer_norm_after.register_forward_hook(lambda *_: calls.append("final_norm")))
    hooks.append(plm.model.lm_head.register_forward_hook(lambda *_: calls.append("lm_head")))
    try:
        plm.representations(SEQS, 1)
        assert calls == [0]
        calls.clear()
        plm.representations(SEQS, N_LAYERS)
        assert calls == [0, 1, 2, "final_norm"]
    finally:
        for h in hooks:
            h.remove()


def test_truncation_warns_with_record_name(plm, caplog):
    long = ("MKTAYIAKQRQISFVKSHFSRQ" * 50)[:1030]
    with caplog.at_level(logging.WARNING):
        (rep,) = plm.representations([long], 2, records=["sp|LONG1|TEST"])
    assert rep.shape == (1022, 32)
    assert "sp|LONG1|TEST" in caplog.text and "1030" in caplog.text
    (first,) = plm.representations([long[:1022]], 2)
    torch.testing.assert_close(rep, first, atol=1e-5, rtol=0)


def test_cpu_is_deterministic(plm):
    a = plm.representations(SEQS, 2)
    b = plm.representations(SEQS, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert plm.lm_loss(SEQS * 3, 1).total == plm.lm_loss(SEQS * 3, 1).total


def test_lm_loss_is_fair_esm_masked_token_loss(plm, reference):
    model, alphabet = reference
    seqs = SEQS * 4
    masks = mask_positions(seqs, seed=7)
    assert [len(m) for m in masks] == [max(1, round(0.15 * len(s))) for s in seqs]
    total, n = 0.0, 0
    for seq, pos in zip(seqs, masks):
        _, _, tokens = alphabet.get_batch_converter()([("", seq)])
        targets = tokens[0, pos + 1].clone()
        tokens[0, pos + 1] = alphabet.mask_idx
        with torch.no_grad():
            logits = model(tokens)["logits"][0, pos + 1]
        total += F.cross_entropy(logits, targets, reduction="sum").item()
        n += len(pos)
    result = plm.lm_loss(seqs, 2, seed=7)
    assert result.n_tokens == n
    assert result.total == pytest.approx(total, rel=1e-5)
    assert plm.lm_loss(seqs, 2, seed=8).total != pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("layer", [0, 1, N_LAYERS])
def test_lm_loss_splice(plm, layer):
    seqs = SEQS * 3
    clean = plm.lm_loss(seqs, layer)
    seen = []

    def identity(rows):
        seen.append(rows.shape)
        return rows

    assert plm.lm_loss(seqs, layer, splice=identity).total == pytest.approx(clean.total, rel=1e-6)
    assert sum(s[0] for s in seen) == sum(map(len, seqs)) and seen[0][1] == 32
    zero = plm.lm_loss(seqs, layer, splice=torch.zeros_like)
    assert zero.n_tokens == clean.n_tokens
    assert abs(zero.total - clean.total) > 1e-3 * clean.total


# --------------------------------------------------------------------------- bad input


def test_unknown_name(monkeypatch):
    with pytest.raises(ModelError, match=r"unknown ESM-2 model 'esm2_t7_9M_UR50D'.*esm2_t33_650M_UR50D"):
        load_plm("esm2_t7_9M_UR50D", "cpu")
    with pytest.raises(ModelError, match="unknown model 'prot_bert'"):
        load_plm("prot_bert", "cpu")


def test_missing_checkpoint_and_regression(tmp_path, ckpt):
    with pytest.raises(ModelError, match=r"checkpoint .*nothere\.pt does not exist"):
        load_plm(str(tmp_path / "nothere.pt"), "cpu")
    lone = tmp_path / "lone.pt"
    shutil.copy(ckpt, lone)
    with pytest.raises(ModelError, match=r"lone-contact-regression\.pt .*missing"):
        load_plm(str(lone), "cpu")


def test_corrupt_and_foreign_checkpoints(tmp_path, ckpt):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    shutil.copy(regression_path(ckpt), regression_path(bad))
    with pytest.raises(ModelError, match=r"bad\.pt is corrupt or not a PyTorch checkpoint"):
        ESM2.load(str(bad), "cpu")

    # A pickled object outside the allow-list must be refused, not executed.
    evil = tmp_path / "evil.pt"
    torch.save({"cfg": {"model": _Foreign()}, "model": {}}, evil)
    shutil.copy(regression_path(ckpt), regression_path(evil))
    with pytest.raises(ModelError, match=r"evil\.pt .*outside the allow-list"):
        ESM2.load(str(evil), "cpu")

    esm1 = tmp_path / "esm1.pt"
    torch.save({"args": argparse.Namespace(arch="roberta_large"), "model": {}}, esm1)
    shutil.copy(regression_path(ckpt), regression_path(esm1))
    with pytest.raises(ModelError, match=r"esm1\.pt is not an ESM-2 checkpoint"):
        ESM2.load(str(esm1), "cpu")

    # Right format, wrong shapes for its cfg: fair-esm's strict load fails -> ModelError.
    data = torch.load(ckpt, map_location="cpu", weights_only=False)
    data["cfg"]["model"].encoder_layers = N_LAYERS + 1
    wrong = tmp_path / "wrong.pt"
    torch.save(data, wrong)
    shutil.copy(regression_path(ckpt), regression_path(wrong))
    with pytest.raises(ModelError, match=r"wrong\.pt does not match the ESM-2 architecture"):
        ESM2.load(str(wrong), "cpu")


class _Foreign:
    pass


def test_name_from_hub_cache_and_fast_download_failure(tmp_path, ckpt, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(esm2_mod, "URL_BASE", "http://127.0.0.1:9/fair-esm")
    with pytest.raises(ModelError, match=r"cannot download ESM-2 model 'esm2_t6_8M_UR50D'.*no internet.*hub.*checkpoints.*local fair-esm checkpoint"):
        load_plm("esm2_t6_8M_UR50D", "cpu")
    assert not (tmp_path / "hub" / "checkpoints" / "esm2_t6_8M_UR50D.pt").exists()

    cache = tmp_path / "hub" / "checkpoints"
    shutil.copy(ckpt, cache / "esm2_t6_8M_UR50D.pt")
    with pytest.raises(ModelError, match=r"esm2_t6_8M_UR50D-contact-regression\.pt"):
        load_plm("esm2_t6_8M_UR50D", "cpu")
    shutil.copy(regression_path(ckpt), cache / "esm2_t6_8M_UR50D-contact-regression.pt")
    plm = load_plm("esm2_t6_8M_UR50D", "cpu")  # found in the cache: no network needed
    assert isinstance(plm, ESM2) and plm.name == "esm2_t6_8M_UR50D" and plm.num_layers == N_LAYERS


def test_bad_residue_and_layer(plm):
    with pytest.raises(ModelError, match=r"sequence 2 contains '1'"):
        plm.representations(["MKV", "MK1V"], 1)
    with pytest.raises(ModelError, match=r"layers 0\.\.3; layer 4"):
        plm.representations(["MKV"], 4)


# ---- fast paths: fused attention, bf16 on CPUs with native bf16 (issue 17) ----
def test_attention_takes_the_fused_kernel_and_equals_fair_esm(plm, reference):
    """Only the fused (flash) SDPA kernel allowed: a shape or mask it cannot take would raise here
    instead of silently falling back to the materialised (B, H, T, T) math path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, alphabet = reference
    _, _, tokens = alphabet.get_batch_converter()([("", s) for s in SEQS])
    with torch.no_grad():
        ref = model(tokens, repr_layers=[N_LAYERS])["representations"][N_LAYERS]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        reps = plm.representations(SEQS, N_LAYERS)
    for b, seq in enumerate(SEQS):
        torch.testing.assert_close(reps[b], ref[b, 1 : len(seq) + 1], atol=1e-5, rtol=0)


needs_bf16 = pytest.mark.skipif(not cpu_native_bf16(),
                                reason="this CPU has no native bf16 (avx512_bf16/amx_bf16)")


@needs_bf16
@pytest.mark.parametrize("layer", range(N_LAYERS + 1))
def test_bf16_cpu_path_within_stated_tolerance(ckpt, plm, layer):
    fast = ESM2.load(str(ckpt), "cpu", dtype="bf16")
    assert fast.autocast_dtype == torch.bfloat16 and plm.autocast_dtype is None
    seqs = SEQS + ["MKTAYIAKQRQISFVKSHFSRQ" * 12]
    ref, got = plm.representations(seqs, layer), fast.representations(seqs, layer)
    for r, g in zip(ref, got):
        assert g.dtype == torch.float32 and g.shape == r.shape
        cos = F.cosine_similarity(r, g, dim=-1)
        assert float(cos.min()) >= 0.999, f"layer {layer}: min per-residue cosine {float(cos.min()):.5f}"
    if layer > 0:  # the bf16 path really runs in bf16: not bit-equal to float32
        assert any(not torch.equal(r, g) for r, g in zip(ref, got))


def test_dtype_errors_name_the_setting(ckpt, monkeypatch):
    with pytest.raises(ModelError, match="--dtype 'fp8'"):
        ESM2.load(str(ckpt), "cpu", dtype="fp8")
    with pytest.raises(ModelError, match="fp16 runs on CUDA only"):
        ESM2.load(str(ckpt), "cpu", dtype="fp16")
    from plmscope.plm import base

    monkeypatch.setattr(base, "cpu_native_bf16", lambda: False)  # a CPU without bf16 instructions
    with pytest.raises(ModelError, match="avx512_bf16 or amx_bf16"):
        ESM2.load(str(ckpt), "cpu", dtype="bf16")
    assert ESM2.load(str(ckpt), "cpu", dtype="fp32").autocast_dtype is None


def test_cpu_forward_in_pieces_keeps_order_and_values(plm, reference, monkeypatch):
    model, alphabet = reference
    _, _, tokens = alphabet.get_batch_converter()([("", s) for s in SEQS])
    with torch.no_grad():
        ref = model(tokens, repr_layers=[2])["representations"][2]
    calls = []
    piece = plm._forward_piece
    monkeypatch.setattr(plm, "_forward_piece", lambda seqs, layers: calls.append(len(seqs)) or piece(seqs, layers))
    monkeypatch.setattr(esm2_mod, "CPU_BATCH_TOKENS", 60)  # SEQS pad to 5 x 45 tokens: several pieces
    reps = plm.representations(SEQS, 2)
    assert len(calls) > 1 and sum(calls) == len(SEQS)
    for b, seq in enumerate(SEQS):
        torch.testing.assert_close(reps[b], ref[b, 1 : len(seq) + 1], atol=1e-5, rtol=0)


# ---- one q/k/v product, weights kept in the autocast dtype, no shared rotary cache ----
def test_fused_projections_are_views_of_the_modules_weights(ckpt, reference):
    """The fused weight's row blocks are the q/k/v modules' weights: an in-place edit of a module
    (as tests and causal edits make) changes the fused product too; a replaced weight (no longer a
    view) makes the layer fall back to the three modules; either way fair-esm's forward agrees."""
    model, alphabet = reference
    plm = ESM2.load(str(ckpt), "cpu")
    attn = plm.model.layers[1].self_attn
    w, b = attn._plmscope_qkv
    assert attn.k_proj.weight.data_ptr() == w[attn.embed_dim:].data_ptr() and attn.v_proj.bias.data_ptr() == b[2 * attn.embed_dim:].data_ptr()
    assert torch.equal(plm.model.state_dict()["layers.1.self_attn.k_proj.weight"], model.state_dict()["layers.1.self_attn.k_proj.weight"])
    _, _, tokens = alphabet.get_batch_converter()([("", s) for s in SEQS])

    def agrees_with_fair_esm():
        with torch.no_grad():
            ref = plm.model(tokens, repr_layers=[N_LAYERS])["representations"][N_LAYERS]
        for bi, (rep, seq) in enumerate(zip(plm.representations(SEQS, N_LAYERS), SEQS)):
            torch.testing.assert_close(rep, ref[bi, 1 : len(seq) + 1], atol=1e-5, rtol=0)
        return ref

    before = agrees_with_fair_esm()
    with torch.no_grad():
        attn.k_proj.weight.mul_(1.7)  # in place: the fused block changes with it
    assert torch.equal(w[attn.embed_dim:2 * attn.embed_dim], attn.k_proj.weight)
    edited = agrees_with_fair_esm()
    assert not torch.allclose(edited, before)
    attn.v_proj.weight = torch.nn.Parameter(attn.v_proj.weight.detach() * 0.5)  # a new tensor: not a view
    assert not torch.allclose(agrees_with_fair_esm(), edited)


@needs_bf16
def test_bf16_load_keeps_layer_weights_in_bf16_with_the_same_results(ckpt):
    """``ESM2.load(dtype=bf16)`` stores the layers' Linear weights in bf16 once; the numbers equal
    the autocast path that casts fp32 weights at every forward (an ESM2 built on a shared model)."""
    owned = ESM2.load(str(ckpt), "cpu", dtype="bf16")
    layer = owned.model.layers[0]
    assert {layer.fc1.weight.dtype, layer.self_attn.q_proj.weight.dtype, owned.model.lm_head.dense.weight.dtype} == {torch.bfloat16}
    assert owned.model.embed_tokens.weight.dtype == torch.float32 and layer.final_layer_norm.weight.dtype == torch.float32
    model, alphabet, name = esm2_mod.load_esm2_modules(str(ckpt))
    shared = ESM2(model, alphabet, name, torch.device("cpu"), dtype="bf16")  # not ours: weights stay fp32
    assert shared.model.layers[0].fc1.weight.dtype == torch.float32
    for a, b in zip(owned.representations(SEQS, N_LAYERS), shared.representations(SEQS, N_LAYERS)):
        assert torch.equal(a, b)
    assert owned.lm_loss(SEQS, N_LAYERS).mean == shared.lm_loss(SEQS, N_LAYERS).mean


def test_threads_running_different_lengths_get_their_own_rotary_tables(plm):
    """fair-esm keeps the rotary tables of the last length on the module; two threads with
    sequences of different lengths used to be able to read each other's.  Each forward now makes
    its own: concurrent results equal serial ones."""
    from concurrent.futures import ThreadPoolExecutor

    seqs = [(AMINO_ACIDS * 20)[: 40 + 17 * i] for i in range(8)]
    serial = [plm.representations([s], N_LAYERS)[0] for s in seqs]
    # the module's cache is neither read nor written: poison it for the next length
    rot = plm.model.layers[0].self_attn.rot_emb
    rot._seq_len_cached, rot._cos_cached, rot._sin_cached = len(seqs[0]) + 2, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1)
    torch.testing.assert_close(plm.representations(seqs[:1], N_LAYERS)[0], serial[0], atol=1e-6, rtol=0)
    assert rot._cos_cached.shape == (1, 1, 1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(4) as ex:
            for _ in range(5):
                got = list(ex.map(lambda s: plm.representations([s], N_LAYERS)[0], seqs))
                for a, b in zip(got, serial):
                    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    finally:
        torch.set_num_threads(before)
