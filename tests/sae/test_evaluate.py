"""plmscope eval-sae: reconstruction metrics, the spliced language-model loss and its baselines
(mean-ablation with the training mean, amino-acid frequencies), the latter checked against
computations by hand on UniRep-64 (real weights) and a tiny random ESM-2."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from plmscope.cli import main
from plmscope.plm.base import load_plm
from plmscope.sequences import read_proteins
from plmscope.sae import load_sae, read_cfg, save_sae
from plmscope.sae.evaluate import EvalSettings, evaluate
from plmscope.sae.model import SparseAutoencoder

KEYS = {"sae", "plm", "layer", "architecture", "d_sae", "k", "corpus", "explained_variance", "mse", "l0",
        "dead_fraction", "dense_fraction", "dense_threshold", "objective", "lm_loss", "headline", "zero_ablation",
        "baselines", "intervals"}
HEADLINE = {"loss_recovered_vs_mean_ablation_pct", "splice_delta_nats", "splice_cost_pct_of_model_gain"}


def _eval(capsys, sae_dir, fasta) -> dict:
    capsys.readouterr()
    assert main(["eval-sae", "--sae", str(sae_dir), "--fasta", str(fasta)]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_sae_json_and_trained_beats_untrained(trained_sae, heldout_fasta, tmp_path, capsys):
    result = _eval(capsys, trained_sae, heldout_fasta)
    assert set(result) == KEYS
    assert set(result["lm_loss"]) == {"unit", "clean", "spliced", "mean_ablated", "zero_ablated", "unigram",
                                      "model_gain_over_unigram", "n_tokens", "n_proteins"}
    assert result["objective"]["name"] == "next-amino-acid" and result["corpus"]["set"] is None
    assert set(result["headline"]) == HEADLINE
    for number in [*result["headline"].values(), result["zero_ablation"]["loss_recovered_vs_zero_ablation_pct"]]:
        lo, hi = number["ci95"]
        assert math.isfinite(number["value"]) and lo <= hi
    # the trained fixture stopped before one pass over its corpus: the mean says over how much it is
    assert result["baselines"]["mean_ablation"]["whole_training_corpus"] is False
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
    recovered = "loss_recovered_vs_mean_ablation_pct"
    assert result["headline"][recovered]["value"] > baseline["headline"][recovered]["value"]
    assert result["explained_variance"] > baseline["explained_variance"]
    # baselines do not depend on the SAE's weights
    for key in ("clean", "mean_ablated", "zero_ablated", "unigram"):
        assert baseline["lm_loss"][key] == result["lm_loss"][key]


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
    assert result["objective"]["name"] == "masked-LM" and result["objective"]["mask_fraction"] == 0.15
    losses = result["lm_loss"]
    assert all(math.isfinite(losses[k]) for k in ("clean", "spliced", "mean_ablated", "zero_ablated", "unigram"))
    assert result["k"] is None and result["architecture"] == "relu"


# --------------------------------------------------------------------------- baselines by hand

STANDARD = "ACDEFGHIKLMNPQRSTVWY"


def _unigram_by_hand(train: list[str], scored: list[str], same_class: dict[str, str], letters: str) -> float:
    """Mean -log p over the scored residues, p = add-one-smoothed frequency over the classes that
    ``letters`` fall into (``same_class`` maps letters a model does not tell apart to one class)."""
    cls = {a: same_class.get(a, a) for a in letters}
    classes = set(cls.values())
    counts = Counter(cls[a] for seq in train for a in seq)
    n = sum(counts.values())
    logp = {c: math.log((counts[c] + 1) / (n + len(classes))) for c in classes}
    scored_all = "".join(scored)
    return -sum(logp[cls[a]] for a in scored_all) / len(scored_all)


def _check_headline(result: dict) -> None:
    lm, head = result["lm_loss"], result["headline"]
    c, s, m, u = lm["clean"], lm["spliced"], lm["mean_ablated"], lm["unigram"]
    assert head["loss_recovered_vs_mean_ablation_pct"]["value"] == pytest.approx((m - s) / (m - c) * 100)
    assert head["splice_delta_nats"]["value"] == pytest.approx(s - c)
    assert head["splice_cost_pct_of_model_gain"]["value"] == pytest.approx((s - c) / (u - c) * 100)
    for number in head.values():
        lo, hi = number["ci95"]
        assert lo <= number["value"] <= hi


def test_unirep_mean_ablation_and_unigram_by_hand(tmp_path, capsys):
    """UniRep-64 (real weights): the training mean, the mean-ablated next-amino-acid loss and the
    amino-acid-frequency loss recomputed one protein at a time, outside lm_loss and its splicing."""
    from tests.sae.conftest import write_fasta
    from tests.plm.test_unirep import CODES

    train_fasta, eval_fasta = write_fasta(tmp_path / "train.fasta", 0, 10), write_fasta(tmp_path / "eval.fasta", 500, 4)
    layer, out = 2, tmp_path / "sae"
    # --epochs 1: the stream passes over every training protein, so the stored mean is the corpus mean
    assert main(["train-sae", "--model", "unirep-64", "--layer", str(layer), "--latents", "64", "--k", "8",
                 "--batch-size", "128", "--buffer-size", "1024", "--epochs", "1", "--fasta", str(train_fasta),
                 "--out", str(out)]) == 0
    result = _eval(capsys, out, eval_fasta)
    train = [p.sequence for p in read_proteins(train_fasta).proteins]
    held = [p.sequence for p in read_proteins(eval_fasta).proteins]
    plm = load_plm("unirep-64", "cpu")

    # residue 1 is context-free for UniRep: left out of the mean, and of the splice and ablations
    mean = torch.cat([r[1:] for r in plm.representations(train, layer)]).double().mean(0)
    stored = torch.tensor(read_cfg(out)["plmscope"]["baselines"]["layer_mean"], dtype=torch.float64)
    assert torch.allclose(stored, mean, atol=1e-6)
    assert result["baselines"]["mean_ablation"]["whole_training_corpus"] is True
    assert result["baselines"]["mean_ablation"]["n_residues"] == sum(len(s) - 1 for s in train)
    # ...and it is not the normalisation mean (a sample of the first shuffle-buffer fill)
    norm_mean = torch.tensor(read_cfg(out)["plmscope"]["normalization"]["mean"], dtype=torch.float64)
    assert not torch.allclose(norm_mean, mean, atol=1e-6)

    total, n = 0.0, 0
    with torch.no_grad():
        for seq in held:
            codes = [CODES[a] for a in seq]
            tokens = torch.tensor([[24] + codes])
            x = plm.embedding[tokens]
            valid = torch.ones(tokens.shape, dtype=torch.bool)
            for i in range(1, plm.num_layers + 1):
                x = plm.layers[i - 1](x, valid)
                if i == layer:
                    x = x.clone()
                    x[0, 2:] = mean.float()  # every residue row but residue 1; column 0 is the start state
            logits = x[0, :-1] @ plm.dense_w + plm.dense_b  # the state before residue j predicts it
            logp = torch.log_softmax(logits.double(), -1)
            total -= float(logp[torch.arange(len(seq)), torch.tensor(codes) - 1].sum())
            n += len(seq)
    assert result["lm_loss"]["n_tokens"] == n
    assert result["lm_loss"]["mean_ablated"] == pytest.approx(total / n, rel=1e-5)

    # UniRep has one class for B, J, X and Z; U and O are classes of their own
    unigram = _unigram_by_hand(train, held, {"B": "X", "J": "X", "Z": "X"}, STANDARD + "BJOUXZ")
    assert result["lm_loss"]["unigram"] == pytest.approx(unigram, rel=1e-9)
    _check_headline(result)
    # a clean model beats amino-acid frequencies; the mean-ablated one loses most of that gain
    lm = result["lm_loss"]
    assert lm["clean"] < lm["unigram"] and lm["clean"] < lm["mean_ablated"] < lm["zero_ablated"]


def test_esm2_mean_ablation_and_unigram_by_hand(tmp_path, capsys):
    """A tiny random ESM-2: the mean-ablated masked-LM loss through fair-esm's own forward with a
    hook on layer 1, and the frequency baseline on the same masked residues."""
    from esm.pretrained import load_model_and_alphabet_core

    from plmscope.plm.esm2 import mask_positions, regression_path, save_random_esm2
    from tests.sae.conftest import write_fasta

    ckpt = save_random_esm2(tmp_path / "esm2_tiny.pt", num_layers=2, embed_dim=32, attention_heads=4, seed=5)
    train_fasta, eval_fasta = write_fasta(tmp_path / "train.fasta", 0, 12), write_fasta(tmp_path / "eval.fasta", 700, 6)
    out, layer, seed = tmp_path / "sae", 1, 11
    assert main(["train-sae", "--model", str(ckpt), "--layer", str(layer), "--latents", "64", "--k", "8",
                 "--batch-size", "128", "--buffer-size", "1024", "--epochs", "1", "--fasta", str(train_fasta),
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval-sae", "--sae", str(out), "--fasta", str(eval_fasta), "--seed", str(seed), "--set", "report"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["corpus"]["set"] == "report"
    assert result["objective"] == {**result["objective"], "name": "masked-LM", "mask_seed": seed}
    train = [p.sequence for p in read_proteins(train_fasta).proteins]
    held = [p.sequence for p in read_proteins(eval_fasta).proteins]

    # fair-esm's own model from the file (not our loader), our layer 1 = output of its layers[0]
    model, alphabet = load_model_and_alphabet_core(
        "esm2_tiny", torch.load(ckpt, weights_only=False), torch.load(regression_path(ckpt), weights_only=False))
    model.eval()
    reps = []
    with torch.no_grad():
        for seq in train:
            _, _, tokens = alphabet.get_batch_converter()([("", seq)])
            reps.append(model(tokens, repr_layers=[layer])["representations"][layer][0, 1 : len(seq) + 1])
    mean = torch.cat(reps).double().mean(0)
    stored = torch.tensor(read_cfg(out)["plmscope"]["baselines"]["layer_mean"], dtype=torch.float64)
    assert torch.allclose(stored, mean, atol=1e-5)

    n_res = {}

    def ablate(_module, _inputs, output):
        x, attn = output  # (T, B, E): rows 1..n are the residues, 0 is BOS and n+1 EOS
        x = x.clone()
        x[1 : n_res["n"] + 1, 0] = mean.float()
        return x, attn

    handle = model.layers[layer - 1].register_forward_hook(ablate)
    total, n, scored = 0.0, 0, []
    try:
        with torch.no_grad():
            for seq, pos in zip(held, mask_positions(held, seed=seed)):
                _, _, tokens = alphabet.get_batch_converter()([("", seq)])
                targets = tokens[0, pos + 1].clone()
                tokens[0, pos + 1] = alphabet.mask_idx
                n_res["n"] = len(seq)
                logits = model(tokens)["logits"][0, pos + 1]
                total += float(torch.nn.functional.cross_entropy(logits.double(), targets, reduction="sum"))
                n += len(pos)
                scored.append("".join(seq[i] for i in pos.tolist()))
    finally:
        handle.remove()
    assert result["lm_loss"]["n_tokens"] == n
    assert result["lm_loss"]["mean_ablated"] == pytest.approx(total / n, rel=1e-5)

    # ESM-2 has a token for each of the 20 + B O U X Z letters and reads J as <unk>
    unigram = _unigram_by_hand(train, scored, {}, STANDARD + "BJOUXZ")
    assert result["lm_loss"]["unigram"] == pytest.approx(unigram, rel=1e-9)
    _check_headline(result)


def test_sae_without_stored_baselines_says_so(trained_sae, heldout_fasta, tmp_path, capsys):
    """An SAE trained before the baselines were stored: null mean-ablation numbers and a reason, not
    a guess from normalization.mean."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(trained_sae, old, ignore=shutil.ignore_patterns("checkpoint"))
    cfg = json.loads((old / "cfg.json").read_text())
    del cfg["plmscope"]["baselines"]
    (old / "cfg.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["eval-sae", "--sae", str(old), "--fasta", str(heldout_fasta), "--max-proteins", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["lm_loss"]["mean_ablated"] is None and result["lm_loss"]["unigram"] is None
    assert result["headline"]["loss_recovered_vs_mean_ablation_pct"] == {"value": None, "ci95": [None, None]}
    info = result["baselines"]["mean_ablation"]
    assert info["available"] is False and "layer_mean" in info["reason"] and "normalization.mean" in info["reason"]
    assert result["baselines"]["unigram"]["available"] is False
    assert math.isfinite(result["zero_ablation"]["loss_recovered_vs_zero_ablation_pct"]["value"])


def test_several_saes_in_one_run_equal_each_evaluated_alone(trained_sae, heldout_fasta, tmp_path, capsys):
    """eval-sae --sae A B shares the clean and ablation passes: every number is what each run alone gives."""
    trained = load_sae(trained_sae)
    other = SparseAutoencoder.from_config(trained.cfg, generator=torch.Generator().manual_seed(5))
    norm = trained.cfg["plmscope"]["normalization"]
    other.set_normalization(torch.tensor(norm["mean"]), norm["scale"])
    save_sae(other, tmp_path / "other")  # trained's cfg: the same baselines (layer mean), so the ablations are shared
    alone = [_eval(capsys, d, heldout_fasta) for d in (trained_sae, tmp_path / "other")]
    assert main(["eval-sae", "--sae", str(trained_sae), str(tmp_path / "other"), "--fasta", str(heldout_fasta)]) == 0
    together = json.loads(capsys.readouterr().out)
    assert together == alone and alone[0]["lm_loss"]["spliced"] != alone[1]["lm_loss"]["spliced"]
