"""plmscope train-sae through the CLI on real demo proteins with UniRep-64."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from plmscope.cli import main
from plmscope.errors import SAEError
from plmscope.sae import load_sae, load_sparsity
from plmscope.provenance import sha256_file
from plmscope.sae.train import TrainSettings, train

from .conftest import TINY_TRAIN


def test_train_sae_writes_a_loadable_saelens_directory(trained_sae, demo_fasta):
    sae = load_sae(trained_sae, plm="unirep-64", layer=2, d_in=64)
    assert (sae.architecture, sae.d_sae, sae.k) == ("topk", 64, 8)
    cfg = json.loads((trained_sae / "cfg.json").read_text())
    p = cfg["plmscope"]
    assert p["corpus"]["sha256"] == sha256_file(demo_fasta) and p["corpus"]["n_proteins"] == 40
    assert p["training"]["steps"] == 60 and p["training"]["tokens"] == 60 * 128
    assert p["training"]["k"] == 8 and p["training"]["aux_coeff"] == pytest.approx(1 / 32)
    assert set(p["training"]["final"]) == {"L0", "MSE", "EV", "dead"}
    scale = p["normalization"]["scale"]
    w = load_file(str(trained_sae / "sae_weights.safetensors"))
    # unit decoder rows in normalised space = rows of norm `scale` once folded into raw space
    assert torch.allclose(w["W_dec"].norm(dim=1), torch.full((64,), scale), rtol=1e-4)
    sparsity = load_sparsity(trained_sae)
    assert sparsity.shape == (64,) and (sparsity <= 0).all()
    assert (trained_sae / "checkpoint" / "state.pt").is_file()


def test_resume_ends_identical_to_uninterrupted_run(tmp_path, demo_fasta):
    common = ["train-sae", *TINY_TRAIN, "--fasta", str(demo_fasta), "--buffer-size", "512", "--checkpoint-every", "3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    # the uninterrupted run through the library (TINY_TRAIN as settings), the split one through the CLI
    train(TrainSettings(model="unirep-64", layer=2, latents=64, k=8, batch_size=128, buffer_size=512, lr=3e-3,
                        fasta=demo_fasta, out=straight, steps=10, checkpoint_every=3))
    assert main([*common, "--out", str(split), "--steps", "4"]) == 0  # "interrupted" after step 4
    assert main([*common, "--out", str(split), "--steps", "10", "--resume"]) == 0
    a = load_file(str(straight / "sae_weights.safetensors"))
    b = load_file(str(split / "sae_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on CPU
    assert json.loads((split / "cfg.json").read_text())["plmscope"]["training"]["steps"] == 10


def test_resume_refuses_other_settings_or_missing_checkpoint(tmp_path, demo_fasta, capsys):
    out = tmp_path / "sae"
    base = ["train-sae", *TINY_TRAIN, "--fasta", str(demo_fasta), "--out", str(out)]
    assert main([*base, "--steps", "2", "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main([*base, "--steps", "2"]) == 0
    capsys.readouterr()
    assert main([*base[:-2], "--out", str(out), "--steps", "4", "--resume", "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "seed: checkpoint 0 vs now 7" in err


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (">P1 ok\nMKTAYIAK\n>P2 bad\nMKTA1YIAK\n", ["record 'P2'", "position 5", "'1'"]),
        (">P1\nMKTA*YIAK\n", ["record 'P1'", "position 5", "stop '*'"]),
        ("", ["no valid protein records"]),
        (">P1\n\n", ["record 'P1'", "empty sequence"]),
        ("MKTAYIAK\n", ["not a FASTA file"]),
    ],
    ids=["digit", "stop-inside", "empty-file", "no-sequence", "no-records"],
)
def test_bad_fasta_exits_2_with_one_clear_message(tmp_path, capsys, content, words):
    fasta = tmp_path / "bad.fasta"
    fasta.write_text(content)
    code = main(["train-sae", "--model", "unirep-64", "--layer", "1", "--fasta", str(fasta), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("plmscope train-sae: error: ") and len(err.splitlines()) == 1, err
    assert str(fasta) in err and all(w in err for w in words), err
    assert "Traceback" not in err


def test_unknown_model_and_bad_settings_exit_2(tmp_path, demo_fasta, capsys):
    base = ["train-sae", "--layer", "1", "--fasta", str(demo_fasta), "--out", str(tmp_path / "o")]
    for name in ("esm3_huge", "protbert"):
        assert main([*base, "--model", name]) == 2
        err = capsys.readouterr().err
        assert err.startswith("plmscope train-sae: error: unknown") and f"'{name}'" in err, err
    assert main([*base, "--model", "unirep-64", "--layer", "9"]) == 2
    assert "layer 9 does not exist" in capsys.readouterr().err
    assert main([*base, "--model", "unirep-64", "--k", "100", "--latents", "64"]) == 2
    assert "--k must be between 1 and --latents" in capsys.readouterr().err


@pytest.mark.parametrize(("changes", "words"), [
    ({"steps": 3, "epochs": 1.0}, "give --steps or --epochs, not both"),
    ({"buffer_size": 512}, "--buffer-size (512) must be at least twice --batch-size (1024)"),
    ({"arch": "relu", "latents": 0}, "--latents must be at least 1, got 0"),
    ({"checkpoint_every": -1}, "--checkpoint-every must be 0"),
])
def test_settings_refuse_bad_flag_combinations(tmp_path, changes, words):
    with pytest.raises(SAEError, match=re.escape(words)):
        TrainSettings(model="unirep-64", layer=1, fasta=tmp_path / "c.fasta", out=tmp_path / "o", **changes)


def test_several_saes_from_one_pass_equal_each_trained_alone(tmp_path, demo_fasta):
    """Layers 1 and 3, two sizes at layer 3: one pLM pass, and each SAE bit-identical to its own run."""
    common = ["--model", "unirep-64", "--batch-size", "128", "--buffer-size", "512", "--lr", "3e-3",
              "--fasta", str(demo_fasta), "--steps", "6", "--checkpoint-every", "0"]
    grid = tmp_path / "grid"
    assert main(["train-sae", *common, "--layer", "1", "3", "--latents", "32", "64", "--k", "4",
                 "--out", str(grid)]) == 0
    names = sorted(p.name for p in grid.iterdir() if p.name != "checkpoint")
    assert names == ["L1-topk32-k4", "L1-topk64-k4", "L3-topk32-k4", "L3-topk64-k4"]
    for layer, latents in ((1, 64), (3, 32)):
        alone = tmp_path / f"alone{layer}"
        assert main(["train-sae", *common, "--layer", str(layer), "--latents", str(latents), "--k", "4",
                     "--out", str(alone)]) == 0
        a = load_file(str(alone / "sae_weights.safetensors"))
        b = load_file(str(grid / f"L{layer}-topk{latents}-k4" / "sae_weights.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
        mine = json.loads((grid / f"L{layer}-topk{latents}-k4" / "cfg.json").read_text())["plmscope"]
        assert mine["training"]["trained_with_layers"] == [1, 3]
        assert mine["baselines"]["layer_mean"] == json.loads((alone / "cfg.json").read_text())["plmscope"]["baselines"]["layer_mean"]


def test_residue_one_of_unirep_never_enters_training(tmp_path, demo_fasta):
    """The layer mean train-sae stores is the mean over every residue but each protein's first."""
    from plmscope.plm.base import load_plm
    from plmscope.sequences import read_proteins

    out = tmp_path / "sae"
    assert main(["train-sae", *TINY_TRAIN, "--fasta", str(demo_fasta), "--out", str(out), "--epochs", "1.1",
                 "--buffer-size", "512", "--checkpoint-every", "0"]) == 0
    cfg = json.loads((out / "cfg.json").read_text())["plmscope"]
    assert cfg["baselines"]["layer_mean_whole_corpus"]
    seqs = [p.sequence for p in read_proteins(demo_fasta).proteins]
    plm = load_plm("unirep-64", "cpu")
    reps = plm.representations(seqs, 2)
    assert cfg["corpus"]["n_residues"] == sum(len(s) - 1 for s in seqs) == cfg["baselines"]["layer_mean_n_residues"]
    expected = torch.cat([r[1:] for r in reps]).double().mean(0)
    with_first = torch.cat(reps).double().mean(0)
    got = torch.tensor(cfg["baselines"]["layer_mean"], dtype=torch.float64)
    assert cfg["training"]["context_free_positions"] == 1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, with_first, atol=1e-5)
