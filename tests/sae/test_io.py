"""SAELens-layout save/load, refusals with clear messages, and SAELens encode compatibility."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from plmscope.errors import SAEError
from plmscope.sae import load_sae, load_sparsity, sae_from_bytes, sae_id, sae_weights_bytes, save_sae
from plmscope.sae.model import SparseAutoencoder, make_cfg


def _trained_like(arch="topk", d_in=24, d_sae=96, k=6, plm="unirep-64", layer=2) -> SparseAutoencoder:
    cfg = make_cfg(plm=plm, layer=layer, d_in=d_in, d_sae=d_sae, architecture=arch, k=k)
    sae = SparseAutoencoder.from_config(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    sae.set_normalization(torch.linspace(-1, 1, d_in), 0.25)
    return sae


@pytest.fixture()
def saved(tmp_path):
    sae = _trained_like()
    out = save_sae(sae, tmp_path / "sae", sparsity=torch.full((96,), -2.0))
    return sae, out


def test_round_trip_and_layout(saved):
    sae, out = saved
    x = torch.randn(50, 24) * 0.25
    loaded = load_sae(out, plm="unirep-64", layer=2, d_in=24)
    assert torch.allclose(loaded.encode(x), sae.encode(x), atol=1e-5)
    assert torch.allclose(loaded(x)[0], sae(x)[0], atol=1e-5)
    assert (loaded.architecture, loaded.d_in, loaded.d_sae, loaded.k, loaded.plm, loaded.layer) == (
        "topk", 24, 96, 6, "unirep-64", 2)

    cfg = json.loads((out / "cfg.json").read_text())
    for key in ("architecture", "d_in", "d_sae", "k", "dtype", "device", "apply_b_dec_to_input",
                "normalize_activations", "metadata"):
        assert key in cfg, key
    assert cfg["architecture"] == "topk" and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["model_name"] == "unirep-64" and cfg["metadata"]["hook_name"] == "repr_layers.2"
    norm = cfg["plmscope"]["normalization"]
    assert norm["scale"] == pytest.approx(0.25) and len(norm["mean"]) == 24

    w = load_file(str(out / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        "W_enc": (24, 96), "b_enc": (96,), "W_dec": (96, 24), "b_dec": (24,)}
    # raw-space decoder rows have norm = scale (unit rows in normalised space, folded)
    assert torch.allclose(w["W_dec"].norm(dim=1), torch.full((96,), 0.25), atol=1e-5)
    assert torch.equal(load_sparsity(out), torch.full((96,), -2.0))


def test_relu_round_trip(tmp_path):
    sae = _trained_like(arch="relu", k=None)
    out = save_sae(sae, tmp_path / "relu")
    assert json.loads((out / "cfg.json").read_text())["architecture"] == "standard"
    x = torch.randn(20, 24)
    assert torch.allclose(load_sae(out).encode(x), sae.encode(x), atol=1e-5)
    assert load_sparsity(out) is None


def test_bytes_round_trip_and_id(saved):
    sae, out = saved
    cfg = json.loads((out / "cfg.json").read_text())
    again = sae_from_bytes(cfg, sae_weights_bytes(sae))
    x = torch.randn(10, 24)
    assert torch.allclose(again.encode(x), sae.encode(x), atol=1e-5)
    assert sae_id(cfg) == "unirep-64.L2.topk96"
    assert sae_id(make_cfg(plm="/ckpts/esm2 tiny.pt", layer=3, d_in=8, d_sae=16, architecture="relu", k=None)) == (
        "esm2-tiny.L3.relu16")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"plm": "esm2_t6_8M_UR50D"}, ["'unirep-64'", "'esm2_t6_8M_UR50D'"]),
        ({"layer": 3}, ["layer 2", "layer 3"]),
        ({"d_in": 1280}, ["d_in=24", "1280"]),
    ],
)
def test_refuses_other_plm_layer_or_width(saved, kwargs, words):
    _, out = saved
    with pytest.raises(SAEError) as err:
        load_sae(out, **kwargs)
    msg = str(err.value)
    assert str(out) in msg and all(w in msg for w in words), msg


def test_refuses_missing_and_corrupt_files(saved, tmp_path):
    _, out = saved
    with pytest.raises(SAEError, match="no such SAE directory"):
        load_sae(tmp_path / "nope")

    weights = out / "sae_weights.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:100])
    with pytest.raises(SAEError, match="corrupt safetensors"):
        load_sae(out)
    weights.unlink()
    with pytest.raises(SAEError, match="sae_weights.safetensors is missing"):
        load_sae(out)
    weights.write_bytes(good)

    w = load_file(str(weights))
    w["W_enc"] = w["W_enc"][:, :10].contiguous()
    save_file(w, tmp_path / "bad.safetensors")
    weights.write_bytes((tmp_path / "bad.safetensors").read_bytes())
    with pytest.raises(SAEError, match="W_enc has shape"):
        load_sae(out)
    weights.write_bytes(good)

    cfg = out / "cfg.json"
    text = cfg.read_text()
    cfg.write_text(text[:-20])
    with pytest.raises(SAEError, match="corrupt JSON") as err:
        load_sae(out)
    assert str(cfg) in str(err.value)
    cfg.write_text(json.dumps({"d_in": 3}))
    with pytest.raises(SAEError, match="missing architecture"):
        load_sae(out)
    cfg.unlink()
    with pytest.raises(SAEError, match="cfg.json is missing"):
        load_sae(out)


def _saelens_topk_encode(directory, x: torch.Tensor) -> torch.Tensor:
    """SAELens's TopK encode, re-implemented from its source, reading only our files.

    sae-lens 6.54.12, sae_lens/saes/sae.py ``SAE.process_sae_in``: x - b_dec * apply_b_dec_to_input
    (``normalize_activations`` 'none' = identity); sae_lens/saes/topk_sae.py ``TopKSAE.encode``:
    hidden_pre = sae_in @ W_enc + b_enc (``rescale_acts_by_decoder_norm`` False), and ``TopK.forward``:
    torch.topk(k), ReLU on the kept values, zeros elsewhere.
    """
    cfg = json.loads((directory / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["normalize_activations"] == "none"
    assert cfg["rescale_acts_by_decoder_norm"] is False
    w = load_file(str(directory / "sae_weights.safetensors"))
    hidden_pre = (x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]
    vals, idx = torch.topk(hidden_pre, k=cfg["k"], dim=-1, sorted=False)
    return torch.zeros_like(hidden_pre).scatter_(-1, idx, vals.relu())


def test_saelens_topk_semantics_match(saved):
    sae, out = saved
    x = torch.randn(100, 24) * 0.25 + torch.linspace(-1, 1, 24)
    assert torch.allclose(_saelens_topk_encode(out, x), sae.encode(x), atol=1e-5)


def test_saelens_loads_and_encodes_identically(saved):
    """With sae-lens installed (the test extra), SAELens itself loads our directory."""
    import sae_lens  # in the test extra: the real SAELens must load and encode our files
    sae, out = saved
    theirs = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    assert type(theirs).__name__ == "TopKSAE" and theirs.cfg.k == 6
    x = torch.randn(100, 24) * 0.25 + torch.linspace(-1, 1, 24)
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), sae.encode(x), atol=1e-5)
        assert torch.allclose(theirs.decode(theirs.encode(x)), sae(x)[0], atol=1e-5)
