"""The bf16 TopK screen gives the codes of the dense fp32 encode, on ordinary and adversarial rows."""

import math

import pytest
import torch

from plmscope.sae.model import SparseAutoencoder, make_cfg
from plmscope.sae.screen import V, TopKScreen, screen_applies


def _sae(d_in=128, d_sae=2048, k=16, seed=0, bias=0.05):
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder.from_config(make_cfg(plm="t", layer=1, d_in=d_in, d_sae=d_sae, k=k), generator=g)
    with torch.no_grad():
        # unequal column norms and biases, as in a trained SAE
        sae.W_enc.mul_(torch.rand(1, d_sae, generator=g) * 1.5 + 0.25)
        sae.b_enc.copy_(bias * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
    return sae


def _inputs(n, d_in, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) * (torch.rand(n, 1, generator=g) * 5 + 0.1)
    x[:, :3] *= 20  # a few large dimensions, like the outlier features of pLM activations
    return x


def _dense_codes(sae, x):
    with torch.no_grad():
        return sae.encode(x)


def _screen_codes(screen, x, d_sae):
    vals, idx = screen(x)
    return torch.zeros(x.shape[0], d_sae).scatter_(1, idx, torch.relu(vals))


def _assert_same_codes(z_dense, z_screen):
    assert torch.equal(z_dense > 0, z_screen > 0), "the screen selected other latents than the dense encode"
    assert torch.allclose(z_dense, z_screen, rtol=1e-5, atol=1e-6)


def test_screen_equals_dense_encode():
    sae = _sae()
    x = _inputs(3000, 128)
    screen = TopKScreen(sae)
    _assert_same_codes(_dense_codes(sae, x), _screen_codes(screen, x, sae.d_sae))
    assert screen.stats["rows"] == 3000
    assert screen.stats["dense_rows"] < 30  # the screen did the work, not the fallback
    assert screen.stats["candidates"] < 3000 * 6 * sae.k


def test_screen_with_unfolded_normalisation():
    sae = _sae(seed=2)
    sae.set_normalization(torch.randn(128) * 0.3, 3.7)
    x = _inputs(1000, 128, seed=2)
    _assert_same_codes(_dense_codes(sae, x), _screen_codes(TopKScreen(sae), x, sae.d_sae))


def test_bf16_scores_stay_within_the_bound():
    """The error bound the screen relies on, E + V |a|, holds for every latent (checked in float64),
    on ordinary rows, huge and tiny ones, and rows that bf16 holds exactly (no input residual)."""
    sae = _sae(seed=3, bias=0.5)
    screen = TopKScreen(sae)
    exact_bf16 = _inputs(50, 128, seed=7).bfloat16().float() + sae.b_dec.detach()
    x = torch.cat([_inputs(2000, 128, seed=3), 1e4 * torch.randn(50, 128), 1e-3 * torch.randn(50, 128), exact_bf16])
    xc = x - sae.b_dec.detach()
    approx, e = screen.approx(xc)
    assert e.dtype == torch.float64 and e.shape == (x.shape[0],)
    exact = xc.double() @ sae.W_enc.detach().double() + sae.b_enc.detach().double()
    ratio = (approx.double() - exact).abs() / (e[:, None] + V * approx.double().abs())
    assert float(ratio.max()) <= 1.0
    assert float(ratio.max()) > 0.1  # the bound is not vacuous either
    # and it is tighter than Cauchy-Schwarz on the whole x.W (3 bf16 units of ||x|| max||W_j||)
    cs = 3 * 2.0**-8 * (xc.double().norm(dim=1) * sae.W_enc.detach().double().norm(dim=0).max())
    assert float((e / cs).median()) < 0.5


def test_near_ties_below_bf16_resolution_are_resolved_exactly():
    """64 latents whose pre-activations differ by 1e-5 relative (bf16 sees them as equal):
    the exact fp32 rescoring must pick the right k."""
    d_in, d_sae, k = 128, 2048, 16
    sae = _sae(d_in, d_sae, k, seed=4, bias=0.0)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(d_in, generator=g)
    with torch.no_grad():
        sae.b_dec.zero_()
        for i in range(64):
            sae.W_enc[:, 500 + 7 * i] = base * (1 + 1e-5 * ((i * 37) % 64))
    x = base.repeat(40, 1) * torch.linspace(0.5, 3, 40)[:, None] + 0.01 * torch.randn(40, d_in, generator=g)
    z_dense, z_screen = _dense_codes(sae, x), _screen_codes(TopKScreen(sae), x, d_sae)
    _assert_same_codes(z_dense, z_screen)
    # and the winners really are the tied family's largest members
    assert (z_screen[:, 500 : 500 + 7 * 64 : 7] > 0).sum(1).min() >= k - 1


def test_rows_outside_the_argument_take_the_dense_path():
    sae = _sae(seed=5)
    screen = TopKScreen(sae)
    x = _inputs(200, 128, seed=5)
    x[:20] = 0.0  # every pre-activation is a bias: tiny thresholds
    x[20:40] = -1e3 * sae.W_enc.detach().sum(1)  # pushes most latents far negative
    z_dense = _dense_codes(sae, x)
    _assert_same_codes(z_dense, _screen_codes(screen, x, sae.d_sae))
    x_bad = x.clone()
    x_bad[5, 3] = math.nan
    vals, idx = screen(x_bad)  # non-finite input: the dense path, same result as encode
    assert torch.isnan(vals[5]).any()
    assert torch.equal(_screen_codes(screen, x[6:], sae.d_sae) > 0, z_dense[6:] > 0)


def test_empty_and_small_batches():
    sae = _sae(seed=6)
    screen = TopKScreen(sae)
    vals, idx = screen(torch.empty(0, 128))
    assert vals.shape == (0, sae.k) and idx.shape == (0, sae.k)
    x = _inputs(1, 128, seed=6)
    _assert_same_codes(_dense_codes(sae, x), _screen_codes(screen, x, sae.d_sae))


def test_when_the_screen_applies():
    assert not screen_applies(_sae(d_in=64))  # GEMM too small to pay for the screen
    assert not screen_applies(_sae(d_sae=1024, k=16))  # 16 groups < 2k
    assert not screen_applies(_sae(), "cuda")
    relu = SparseAutoencoder.from_config(make_cfg(plm="t", layer=1, d_in=128, d_sae=2048, architecture="relu", k=None))
    assert not screen_applies(relu)
    with pytest.raises(ValueError):
        TopKScreen(relu)
    with pytest.raises(ValueError):
        TopKScreen(_sae(d_sae=1000))
