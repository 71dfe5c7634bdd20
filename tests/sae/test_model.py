"""SparseAutoencoder: TopK/AuxK, ReLU+L1, decoder row norms, normalisation folding."""

from __future__ import annotations

import torch

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
