"""SparseAutoencoder: TopK/AuxK, ReLU+L1, decoder row norms, normalisation folding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plmscope.errors import SAEError
from plmscope.sae.model import SparseAutoencoder, fold_normalization, make_cfg, unfold_normalization


def _sae(arch="topk", d_in=16, d_sae=48, k=4, seed=0, **training) -> SparseAutoencoder:
    cfg = make_cfg(plm="test", layer=1, d_in=d_in, d_sae=d_sae, architecture=arch, k=k, training=training)
    return SparseAutoencoder.from_config(cfg, generator=torch.Generator().manual_seed(seed))


def _sparse_data(g: torch.Generator, n: int, feats: torch.Tensor, m: int) -> torch.Tensor:
    """Tokens = m random ground-truth features with random positive coefficients."""
    idx = torch.randint(0, feats.shape[0], (n, m), generator=g)
    return (torch.rand(n, m, generator=g)[..., None] * 2 * feats[idx]).sum(1)


def _features(g: torch.Generator, n: int, d: int) -> torch.Tensor:
    f = torch.randn(n, d, generator=g)
    return f / f.norm(dim=1, keepdim=True)


def _train(sae: SparseAutoencoder, steps: int, lr: float, feats, m: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for _ in range(steps):
        out = sae.training_loss(_sparse_data(g, 256, feats, m))
        opt.zero_grad()
        out["loss"].backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()


def test_topk_keeps_exactly_k_nonzeros_per_row():
    sae = _sae(k=5)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # all pre-activations positive, so the ReLU removes none of the top k
    x = torch.randn(200, 16)
    z = sae.encode(x)
    assert ((z > 0).sum(dim=1) == 5).all()
    pre = sae._pre(sae.normalize(x))
    assert torch.equal((z > 0), torch.zeros_like(z, dtype=torch.bool).scatter_(1, pre.topk(5).indices, True))
    # with the default (zero) bias the ReLU may drop some, never add
    assert ((_sae(k=5).encode(x) > 0).sum(dim=1) <= 5).all()


def test_auxk_loss_only_with_dead_latents():
    sae = _sae(dead_tokens=1000)
    x = torch.randn(64, 16)
    assert float(sae.training_loss(x)["aux"]) == 0.0  # nothing has been silent for 1000 tokens yet
    with torch.no_grad():
        sae.tokens_since_fired[:20] = 1000  # 20 latents dead
    out = sae.training_loss(x)
    assert float(out["aux"].detach()) > 0
    out["aux"].backward()
    # the auxiliary loss trains only the dead latents' encoder columns
    assert sae.W_enc.grad[:, 20:].abs().max() == 0 and sae.W_enc.grad[:, :20].abs().max() > 0


def test_auxk_revives_dead_latents():
    """Half the latents start collapsed (tiny encoder columns: never in the top k, so no gradient
    from the main loss).  Without AuxK they stay dead; with it most of them come back."""
    g = torch.Generator().manual_seed(0)
    feats = _features(g, 512, 32)

    def dead_after(aux_coeff: float) -> float:
        sae = _sae(d_in=32, d_sae=256, k=4, aux_coeff=aux_coeff, aux_k=16, dead_tokens=1024)
        with torch.no_grad():
            sae.W_enc[:, 128:] *= 0.01
        _train(sae, 150, 3e-3, feats, 4)
        z = sae.encode(_sparse_data(torch.Generator().manual_seed(1), 10000, feats, 4))
        return float(((z > 0).sum(0) == 0).float().mean())

    without, with_aux = dead_after(0.0), dead_after(1 / 32)
    assert without >= 0.45
    assert with_aux < without - 0.15


def test_decoder_rows_unit_norm_per_latent():
    # d_sae != d_in: unit rows (per latent) and unit columns cannot both hold, so normalising the
    # wrong axis (as InterProt does) fails this test.
    g = torch.Generator().manual_seed(0)
    sae = _sae(d_in=16, d_sae=48)
    _train(sae, 20, 1e-2, _features(g, 64, 16), 3)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)
    assert not torch.allclose(sae.W_dec.norm(dim=0), torch.ones(16), atol=1e-2)


def test_parallel_gradient_removed_per_row():
    sae = _sae()
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_grad_()
    assert (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs().max() < 1e-5


def test_relu_l1_sparsity_increases_with_coefficient():
    g = torch.Generator().manual_seed(0)
    feats = _features(g, 64, 16)
    x = _sparse_data(torch.Generator().manual_seed(5), 2000, feats, 3)
    l0 = []
    for coeff in (0.01, 0.3, 3.0):
        sae = _sae(arch="relu", k=None, l1_coeff=coeff)
        _train(sae, 120, 3e-3, feats, 3)
        l0.append(float((sae.encode(x) > 0).sum(1).float().mean()))
    assert l0[0] > l0[1] > l0[2], l0


def test_folded_raw_space_encode_equals_normalised_space_encode():
    torch.manual_seed(0)
    for arch, k in (("topk", 6), ("relu", None)):
        sae = _sae(arch=arch, k=k)
        with torch.no_grad():
            for p in (sae.W_enc, sae.b_enc, sae.b_dec):
                p.copy_(torch.randn_like(p))
        mean, scale = torch.randn(16) * 3, 0.37
        sae.set_normalization(mean, scale)
        x = torch.randn(300, 16) * scale + mean  # raw pLM-like vectors
        z_ref = sae._activate(sae._pre((x - mean) / scale))  # encode in normalised space
        xhat_ref = (z_ref @ sae.W_dec + sae.b_dec) * scale + mean

        folded = SparseAutoencoder.from_config(sae.cfg)
        folded.load_raw_weights(sae.raw_weights())  # identity normalisation, raw-space weights
        assert torch.allclose(folded.encode(x), z_ref, atol=1e-5)
        assert torch.equal(folded.encode(x) > 0, z_ref > 0)  # same latents selected
        assert torch.allclose(folded.decode(folded.encode(x)), xhat_ref, atol=1e-4)

        raw = sae.raw_weights()
        back = unfold_normalization(raw, mean, scale)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.allclose(back[name], getattr(sae, name).detach(), atol=1e-5), name
        again = fold_normalization(back, mean, scale)
        for name in raw:
            assert torch.allclose(again[name], raw[name], atol=1e-5), name


def test_encode_topk_is_exactly_what_encode_scatters():
    """The build's sparse TopK path (``encode_topk``) and the dense ``encode`` (live inference,
    eval) give bitwise the same latents and values, with and without a folded normalisation,
    including rows with ties at the k-th value (duplicated encoder columns)."""
    g = torch.Generator().manual_seed(3)
    sae = _sae(d_in=24, d_sae=96, k=6, seed=3)
    with torch.no_grad():
        sae.W_enc[:, 10] = sae.W_enc[:, 11]  # two latents with identical pre-activations
        sae.b_enc.copy_(0.1 * torch.randn(96, generator=g))
        sae.b_enc[10] = sae.b_enc[11]
    x = torch.randn(300, 24, generator=g)
    for mean, scale in ((torch.zeros(24), 1.0), (torch.randn(24, generator=g), 2.5)):
        sae.set_normalization(mean, scale)
        with torch.no_grad():
            z = sae.encode(x)
            vals, idx = sae.encode_topk(x)
            z_scatter = torch.zeros_like(z).scatter_(-1, idx, torch.relu(vals))
            assert torch.equal(z, z_scatter)
            # a reused pre-activation buffer (taller than the block, holding an earlier block's
            # values) gives the very same codes
            scratch = torch.full((512, 96), 7.0)
            for _ in range(2):
                v_out, i_out = sae.encode_topk(x, out=scratch)
                assert torch.equal(v_out, vals) and torch.equal(i_out, idx)
            # and both equal the plain formula (the grad path of _pre: out-of-place bias add)
        with torch.enable_grad():
            pre_grad = sae._pre(sae.normalize(x))
        ref = pre_grad.detach().gather(-1, idx)
        assert torch.equal(vals, ref)
    with pytest.raises(SAEError):
        _sae(arch="relu").encode_topk(x[:, :16])


def test_build_sparse_codes_equal_dense_encode():
    from plmscope.atlas.aggregate import sparse_codes
    from plmscope.atlas.encode import encode_scratch, sparse_encode as _encode

    g = torch.Generator().manual_seed(4)
    sae = _sae(d_in=16, d_sae=64, k=5, seed=4)
    x = torch.randn(1000, 16, generator=g)
    for max_rows in (1000, 300):  # one chunk; four equal chunks of 250 rows
        rows, lat, val = _encode(sae, x, max_rows=max_rows)
        step = -(-1000 // -(-1000 // max_rows))
        with torch.no_grad():
            dense = [sparse_codes(sae.encode(x[a : a + step]), a) for a in range(0, 1000, step)]
        r2, l2, v2 = (np.concatenate([d[i] for d in dense]) for i in range(3))
        o = np.lexsort((lat, rows))  # encode_topk's order within a row is topk's, not by latent
        assert np.array_equal(rows, np.sort(rows))  # rows ascending, as the aggregation expects
        assert np.array_equal(rows[o], r2) and np.array_equal(lat[o], l2) and np.array_equal(val[o], v2)
        # the build's reused pre-activation buffer changes nothing
        with_scratch = _encode(sae, x, max_rows=max_rows, scratch=encode_scratch(sae, None))
        assert all(np.array_equal(a, b) for a, b in zip(with_scratch, (rows, lat, val)))
    assert encode_scratch(_sae(arch="relu"), None) is None
    assert all(len(a) == 0 for a in _encode(sae, x[:0]))
