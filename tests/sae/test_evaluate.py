"""plmscope eval-sae: reconstruction metrics and the spliced language-model loss."""

from __future__ import annotations

import json
import math

import torch

from plmscope.cli import main
from plmscope.sae import load_sae, read_cfg, save_sae
from plmscope.sae.evaluate import EvalSettings, evaluate
from plmscope.sae.model import SparseAutoencoder

KEYS = {"sae", "plm", "layer", "architecture", "d_sae", "k", "corpus", "explained_variance", "mse", "l0",
        "dead_fraction", "dense_fraction", "dense_threshold", "lm_loss", "loss_recovered_pct"}


def _eval(capsys, sae_dir, fasta) -> dict:
    capsys.readouterr()
    assert main(["eval-sae", "--sae", str(sae_dir), "--fasta", str(fasta)]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_sae_json_and_trained_beats_untrained(trained_sae, heldout_fasta, tmp_path, capsys):
    result = _eval(capsys, trained_sae, heldout_fasta)
    assert set(result) == KEYS
    assert set(result["lm_loss"]) == {"objective", "clean", "spliced", "zero_ablated", "n_tokens"}
    assert "next-amino-acid" in result["lm_loss"]["objective"]
    assert math.isfinite(result["loss_recovered_pct"])
    assert 0 < result["explained_variance"] <= 1 and 0 < result["l0"] <= 8
    assert 0 <= result["dead_fraction"] <= 1 and 0 <= result["dense_fraction"] <= 1
    assert result["corpus"]["n_proteins"] == 8
    # written into the SAE directory: eval.json and cfg.json's plmscope.metrics
    assert json.loads((trained_sae / "eval.json").read_text()) == result
    assert read_cfg(trained_sae)["plmscope"]["metrics"] == result
    assert json.loads(json.dumps(evaluate(EvalSettings(trained_sae, heldout_fasta)))) == result  # the library alone
    load_sae(trained_sae, plm="unirep-64", layer=2)  # cfg still valid after the update

    # same architecture and normalisation, random weights
    trained = load_sae(trained_sae)
    untrained = SparseAutoencoder.from_config(trained.cfg, generator=torch.Generator().manual_seed(3))
    norm = trained.cfg["plmscope"]["normalization"]
    untrained.set_normalization(torch.tensor(norm["mean"]), norm["scale"])
    save_sae(untrained, tmp_path / "untrained")
    baseline = _eval(capsys, tmp_path / "untrained", heldout_fasta)
    assert result["loss_recovered_pct"] > baseline["loss_recovered_pct"]
    assert result["explained_variance"] > baseline["explained_variance"]


def test_eval_sae_refuses_bad_directory(tmp_path, heldout_fasta, capsys):
    assert main(["eval-sae", "--sae", str(tmp_path / "missing"), "--fasta", str(heldout_fasta)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plmscope eval-sae: error: ") and "no such SAE directory" in err


def test_tiny_random_esm2_relu_sae_masked_loss(tmp_path, demo_fasta, heldout_fasta, capsys):
    """The ESM-2 path end to end: a random ESM-2 in fair-esm's format, a ReLU+L1 SAE, masked-token loss."""
    from plmscope.plm.esm2 import save_random_esm2

    ckpt = save_random_esm2(tmp_path / "esm2_tiny.pt", num_layers=2, embed_dim=32, attention_heads=4)
    out = tmp_path / "esm_sae"
    assert main(["train-sae", "--model", str(ckpt), "--layer", "1", "--fasta", str(demo_fasta), "--out", str(out),
                 "--arch", "relu", "--latents", "64", "--l1-coeff", "0.1", "--steps", "10", "--batch-size", "128",
                 "--buffer-size", "1024"]) == 0
    cfg = read_cfg(out)
    assert cfg["architecture"] == "standard" and cfg["plmscope"]["layer"] == 1
    result = _eval(capsys, out, heldout_fasta)
    assert "masked-token" in result["lm_loss"]["objective"] and "15%" in result["lm_loss"]["objective"]
    losses = result["lm_loss"]
    assert all(math.isfinite(losses[k]) for k in ("clean", "spliced", "zero_ablated"))
    assert result["k"] is None and result["architecture"] == "relu"
    assert result["loss_recovered_pct"] is None or math.isfinite(result["loss_recovered_pct"])
