"""A tiny random ESM-2 in fair-esm's official format and UniRep-64, each with a small TopK SAE at
layer 1 (so that layers after the SAE exist and must run)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_plm, make_sae

SEQ = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEK"


@pytest.fixture(scope="session")
def esm_pair(tmp_path_factory):
    from plmscope.plm.esm2 import ESM2
    from plmscope.sae.io import load_sae

    root = tmp_path_factory.mktemp("causal_esm")
    plm = ESM2.load(make_plm(root), "cpu")
    sae = load_sae(make_sae(root / "sae_l1", plm.name, layer=1, d_in=64, d_sae=128, k=8, seed=1))
    return plm, sae.eval()


@pytest.fixture(scope="session")
def unirep_pair(tmp_path_factory):
    from plmscope.plm.unirep import UniRep
    from plmscope.sae.io import load_sae

    root = tmp_path_factory.mktemp("causal_unirep")
    plm = UniRep.load("unirep-64", "cpu")
    sae = load_sae(make_sae(root / "sae_l1", "unirep-64", layer=1, d_in=64, d_sae=128, k=8, seed=2))
    return plm, sae.eval()


@pytest.fixture(params=["esm2", "unirep"])
def pair(request):
    # no autograd in these tests; restored afterwards, so that later tests (train-sae) are unaffected
    with torch.no_grad():
        yield request.getfixturevalue("esm_pair" if request.param == "esm2" else "unirep_pair")


from tests.analysis.conftest import mini_atlas  # noqa: E402,F401  (the analysis tests' real UniRep-64 atlas)
