"""The batched mutation scan equals the brute-force path (one forward per variant)."""

from __future__ import annotations

import numpy as np
import pytest

from plmscope.causal.scan import ScanSettings, scan, scan_brute_force
from plmscope.errors import InputError

from .conftest import SEQ

SHORT = SEQ[:14]


def test_scan_matches_brute_force(pair):
    plm, sae = pair
    settings = ScanSettings(start=4, end=6, token_budget=64)  # several batches
    wt = sae.encode(plm.representations([SHORT], sae.layer)[0])
    latents = [int(i) for i in wt.sum(0).argsort(descending=True)[:3]]
    fast, slow = scan(plm, sae, SHORT, latents, settings), scan_brute_force(plm, sae, SHORT, latents, settings)
    assert fast.n_variants == 3 * 19
    assert list(fast.position) == list(slow.position) and fast.mutant == slow.mutant
    np.testing.assert_allclose(fast.site, slow.site, atol=1e-5)
    np.testing.assert_allclose(fast.max, slow.max, atol=1e-5)
    np.testing.assert_allclose(fast.score, slow.score, atol=1e-4)
    assert fast.score_name == ("masked_marginal_log_ratio" if plm.family == "esm2" else "delta_log_likelihood")
    # the scan sees something: some substitution moves some latent and the scores vary
    assert np.abs(fast.site - fast.wild_type[fast.position - 1]).max() > 1e-3
    assert np.ptp(fast.score) > 1e-3
    positions, grid = fast.grid(latents[0])
    assert positions == [4, 5, 6] and grid.shape == (20, 3)
    rows = list(fast.rows("x"))
    assert len(rows) == 3 * 19 * 3 and rows[0]["wild_type"] == SHORT[3]


def test_scan_bad_input(esm_pair):
    plm, sae = esm_pair
    with pytest.raises(InputError, match="latents 0..127"):
        scan(plm, sae, SHORT, [999])
    with pytest.raises(InputError, match="beyond the sequence"):
        scan(plm, sae, SHORT, [1], ScanSettings(start=40))
    with pytest.raises(InputError, match="at least one latent"):
        scan(plm, sae, SHORT, [])
