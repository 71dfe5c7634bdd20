"""The shared ProteinLM machinery: token batching, streaming, layer checks, device, dispatch."""

from __future__ import annotations

import logging

import pytest
import torch

from plmscope.errors import ModelError
from plmscope.plm.base import LossResult, load_plm, resolve_device, token_batches
from plmscope.plm.esm2 import ESM2, save_random_esm2
from plmscope.vocab import AMINO_ACIDS


@pytest.fixture(scope="module")
def plm(tmp_path_factory):
    path = save_random_esm2(tmp_path_factory.mktemp("esm") / "t.pt", None, num_layers=2, embed_dim=32, attention_heads=4)
    return load_plm(str(path), "cpu")


def _items(lengths):
    return [(f"r{i}", "M" * n) for i, n in enumerate(lengths)]


def test_token_batches_respect_budget_and_sort():
    items = _items([50, 3, 200, 17, 17, 90, 1, 400, 64])
    batches = token_batches(items, 256)
    flat = [it for b in batches for it in b]
    assert sorted(flat) == sorted(items)
    lengths = [len(s) for _, s in flat]
    assert lengths == sorted(lengths)
    for b in batches:
        longest = max(len(s) for _, s in b) + 2
        assert longest * len(b) <= 256 or len(b) == 1
    assert [len(s) for _, s in batches[-1]] == [400]  # over budget: alone
    assert len(batches) < len(items)  # short ones do share batches


def test_iter_representations_streams_within_budget(plm):
    shapes = []
    hook = plm.model.embed_tokens.register_forward_hook(lambda m, inp, out: shapes.append(tuple(inp[0].shape)))
    items = [(f"r{i}", AMINO_ACIDS[: 1 + (i * 7) % 20] * (1 + i % 3)) for i in range(30)]
    try:
        out = list(plm.iter_representations(items, 1, token_budget=120, sort_window=8))
    finally:
        hook.remove()
    assert sorted(rid for rid, _, _ in out) == sorted(rid for rid, _ in items)
    for rid, seq, rep in out:
        assert rep.shape == (len(seq), 32) and dict(items)[rid] == seq
    assert all(b * t <= 120 for b, t in shapes)
    assert len(shapes) < len(items)


def test_truncate_names_record(plm, caplog):
    with caplog.at_level(logging.WARNING):
        assert plm.truncate("A" * 1023, "P12345") == "A" * 1022
        assert plm.truncate("A" * 1022, "Q0") == "A" * 1022
    assert "P12345" in caplog.text and "Q0" not in caplog.text


def test_check_layer_and_dispatch(plm):
    assert isinstance(plm, ESM2) and plm.family == "esm2"
    with pytest.raises(ModelError, match=r"layers 0\.\.2; layer -1 does not exist"):
        plm.check_layer(-1)
    with pytest.raises(ModelError, match="unknown model"):
        load_plm("bert-base", "cpu")
    assert LossResult(6.0, 4).mean == 1.5 and LossResult(0.0, 0).mean == 0.0


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda")
