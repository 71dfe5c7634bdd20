"""TopK codes on CPU in less time, still exact: a bf16 screen, then fp32 scores for the
few candidates it cannot rule out.

The dense TopK encode is one (n, d_in) x (d_in, d_sae) fp32 GEMM plus a top-k over d_sae columns.
On a CPU with AVX-512 BF16 the same GEMM in bf16 runs several times faster, but bf16 keeps 8
significant bits, so its pre-activations are only approximate.  ``TopKScreen`` uses them only to
rule latents *out*, with a proven error bound, and computes the survivors exactly:

1. ``a = bf16(x - b_dec) @ bf16([W_enc; b_enc])`` (the bias is an extra input column, so every
   rounding is an input rounding or the single fp32 -> bf16 output rounding);
2. a bound on ``|a_j - pre_j|``, per latent: ``E + v |a_j|``.  ``E`` (per row) covers the input
   roundings through their actual residuals (``x = x~ + r_x`` and ``W = W~ + r_W`` are known, so
   ``x.W - x~.W~ = r_x.W~ + x~.r_W + r_x.r_W``, each bounded by Cauchy-Schwarz with the row's
   ``||r_x||`` and the columns' largest ``||W~_j||`` and ``||r_W_j||``), the bias's rounding and
   fp32 accumulation; ``v |a_j|`` with ``v = u / (1 - u)`` covers the one output rounding, which
   is relative to the value itself;
3. ``tau`` = the k-th largest of the maxima of ``d_sae / GROUP`` groups of latents: at least k latents
   have ``a >= tau``, so the k-th largest exact pre-activation is ``>= tau (1 - v) - E``, and a
   latent can reach it only if ``a >= (tau (1 - v) - 2E) / (1 + v)``;
4. the latents above that threshold (a few dozen per row for a 4096-latent k=32 SAE; a
   Cauchy-Schwarz bound on the whole ``x.W`` would leave more than twice as many) are scored exactly in fp32
   (``torch.sparse.sampled_addmm``) and the top k of those exact scores is the answer.

So the selected latents and their values are those of ``SparseAutoencoder.encode`` after the
ReLU; values differ only by fp32 summation order (~1e-7 relative), and among exactly tied
pre-activations either latent may be picked, as with ``torch.topk``.  Rows where the argument
does not apply (a non-positive threshold, too many candidates, non-finite input) take the dense
fp32 path.  Tests check all of it against the dense encode, including adversarial rows.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

# Latents per group for the k-th-largest lower bound (tau).  Groups are interleaved (latent j is
# in group j % (d_sae / GROUP)), so their maxima are a max over GROUP contiguous rows of a
# (GROUP, d_sae / GROUP) view, which vectorises where contiguous groups would not.  Small groups
# give a higher tau, so fewer candidates.
GROUP = 16
U = 2.0**-8  # unit roundoff of bf16 (8 significant bits, round to nearest even)
V = U / (1 - U)  # |fl(s) - s| <= u |s| <= v |fl(s)| for the output rounding
# The bound and threshold are computed in float64 from fp32 inputs; shrinking the threshold by
# this factor covers float64's own roundings and the conversion of the threshold to fp32.
SLACK = 1 - 2.0**-20
MAX_CANDIDATES_PER_K = 6  # rows with more than 6 k candidates take the dense path
# Rows per pass: the (rows, d_sae) bf16 screen then stays in cache for the compare and scan that
# follow, and the per-call overhead is spread over enough rows.
BLOCK_ROWS = 2048


def bf16_fast() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 / AMX); emulated bf16 is slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def screen_applies(sae, device: torch.device | str = "cpu") -> bool:
    """Worth it and valid: a TopK SAE on a bf16-capable CPU, wide enough that the bf16 GEMM
    dominates (d_sae a multiple of GROUP and >= 128 k, d_in >= 128)."""
    return (
        torch.device(device).type == "cpu"
        and getattr(sae, "architecture", None) == "topk"
        and sae.d_in >= 128
        and sae.d_in <= 8192
        and sae.d_sae % GROUP == 0
        and sae.d_sae >= 128 * sae.k
        and bf16_fast()
    )


class TopKScreen:
    """Exact TopK codes of a (CPU, fp32) ``SparseAutoencoder`` through a bf16 screen."""

    def __init__(self, sae) -> None:
        if sae.architecture != "topk" or sae.d_sae % GROUP or sae.d_sae // GROUP < sae.k:
            raise ValueError(f"TopKScreen needs a TopK SAE with d_sae a multiple of {GROUP} and >= {GROUP} k")
        with torch.no_grad():
            self.k = sae.k
            # normalisation is folded into the weights for every saved SAE; keep it general anyway
            scale = float(sae.norm_scale)
            self.mean = sae.norm_mean.detach().float()
            self.scale = scale
            self.W = sae.W_enc.detach().float().contiguous()  # (d_in, d_sae)
            self.b_enc = sae.b_enc.detach().float().contiguous()
            self.b_dec = sae.b_dec.detach().float()
            # bias as one more input row; pad K to a multiple of 16 for the bf16 kernels
            d = self.W.shape[0]
            self.K = -(-(d + 1) // 16) * 16
            Wa = torch.zeros(self.K, sae.d_sae)
            Wa[:d] = self.W
            Wa[d] = self.b_enc
            self.Wb = Wa.bfloat16().contiguous()
            # float64 facts about the rounded weights for the bound (see the module docstring)
            W64, Wt = self.W.double(), self.Wb[:d].double()
            bt = self.Wb[d].double()
            self.wt_max = float(Wt.norm(dim=0).max())  # max_j ||W~_j||
            self.rw_max = float((W64 - Wt).norm(dim=0).max())  # max_j ||W_j - W~_j||
            self.rb_max = float((self.b_enc.double() - bt).abs().max())
            self.bt_max = float(bt.abs().max())
            # fp32 accumulation of K products: gamma_K (Higham), on sum_i |x~_i W~_ij| + |b~_j|
            self.gamma = self.K * 2.0**-24 / (1 - self.K * 2.0**-24)
            # products or inputs below fp32's normal range may be flushed to zero by the bf16
            # dot-product instructions: at most 2^-126 (1 + |W~|) per term
            self.flush = self.K * 2.0**-125 * (1 + float(Wt.abs().max()) + self.bt_max)
        self.block_rows = BLOCK_ROWS
        self.stats = {"rows": 0, "dense_rows": 0, "candidates": 0}
        self._approx_out: torch.Tensor | None = None

    def _dense(self, xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = xc @ self.W
        return pre.add_(self.b_enc).topk(self.k, dim=-1, sorted=False)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, latents), (n, k) each: the top-k pre-activations (before the ReLU) as far as
        they are positive; entries the ReLU would zero may name other latents than ``encode``."""
        x = x.float()
        if self.scale != 1.0 or bool(self.mean.any()):
            x = (x - self.mean) / self.scale
        xc = x - self.b_dec
        b = self.block_rows
        if xc.shape[0] <= b:
            return self._block(xc)
        parts = [self._block(xc[a : a + b]) for a in range(0, xc.shape[0], b)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def approx(self, xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bf16 pre-activations (n, d_sae) of centred inputs ``xc`` and a per-row term ``E`` (n,),
        float64, such that ``|a_j - pre_j| <= E + V |a_j|`` for every latent j.  The
        pre-activations are a view of a buffer that the next call overwrites."""
        n, d = xc.shape
        xa = torch.zeros(n, self.K, dtype=torch.bfloat16)
        xa[:, :d] = xc
        xa[:, d] = 1.0
        # x - x~ is exact in fp32 (x~ is x rounded to 8 bits); its norm and ||x~|| in float64
        r_x = (xc - xa[:, :d].float()).double().norm(dim=1)
        x_t = xa[:, :d].double().norm(dim=1)
        e = (r_x * self.wt_max + (x_t + r_x) * self.rw_max + self.rb_max
             + self.gamma * (x_t * self.wt_max + self.bt_max) + self.flush * (1 + x_t))
        # one (BLOCK_ROWS, d_sae) bf16 buffer reused by every block: a fresh one per block came
        # and went between a streaming build's longer-lived arrays and fragmented the heap
        if self._approx_out is None or self._approx_out.shape[0] < n:
            self._approx_out = torch.empty(max(n, 1024), self.Wb.shape[1], dtype=torch.bfloat16)
        return torch.mm(xa, self.Wb, out=self._approx_out[:n]), e

    def _block(self, xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, d = xc.shape
        L, k = self.W.shape[1], self.k
        if n == 0:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.int64)
        if not bool(torch.isfinite(xc).all()):
            return self._dense(xc)
        a, e = self.approx(xc)
        # Non-negative bf16 values order like their bit patterns read as int16 (negative ones
        # come out negative): int16 max/compare is exact here and much faster than bf16 ops
        # (numpy's int16 compare and flatnonzero are faster than torch's).
        ai = a.view(torch.int16)
        group_max = ai.view(n, GROUP, L // GROUP).amax(1).numpy()
        tau_bits = torch.from_numpy(np.partition(group_max, L // GROUP - k, axis=1)[:, L // GROUP - k].copy())
        ai = ai.numpy()
        tau = tau_bits.view(torch.bfloat16).double()
        thr = ((tau * (1 - V) - 2 * e) / (1 + V) * SLACK).float()
        thr_b = _bf16_round_down(thr)
        # thr > 0 also makes every candidate's exact score positive where it matters (the ReLU)
        ok = (tau_bits > 0) & (thr_b > 0) & torch.isfinite(e)
        thr_bits = torch.where(ok, thr_b.view(torch.int16), torch.tensor(32767, dtype=torch.int16))
        flat = np.flatnonzero(ai >= thr_bits.numpy()[:, None])
        del a, ai
        rows_np, cols_np = np.divmod(flat, L)
        rows, cols = torch.from_numpy(rows_np), torch.from_numpy(cols_np)
        counts = torch.from_numpy(np.bincount(rows_np, minlength=n))
        ok &= counts <= MAX_CANDIDATES_PER_K * k
        if not bool(ok.all()):
            keep = ok[rows]
            rows, cols = rows[keep], cols[keep]
            counts = torch.where(ok, counts, 0)
        crow = torch.zeros(n + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=crow[1:])
        width = max(k, int(counts.max())) if n else k
        vals = torch.full((n, k), -math.inf)
        idx = torch.zeros((n, k), dtype=torch.int64)
        if len(cols):
            with warnings.catch_warnings():  # "sparse CSR support is in beta": sampled_addmm is all we use
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(crow, cols, self.b_enc[cols], size=(n, L), check_invariants=False)
            exact = torch.sparse.sampled_addmm(pattern, xc, self.W).values()  # b_enc + xc . W[:, j]
            slot = rows * width + (torch.arange(len(rows)) - crow[rows])
            padded = torch.full((n * width,), -math.inf)
            padded[slot] = exact
            v, i = padded.view(n, width).topk(k, dim=-1, sorted=False)
            # every ok row has >= k candidates (the k group maxima are >= tau >= thr)
            src = (crow[:-1, None] + i).clamp_(max=len(cols) - 1)
            vals, idx = v, cols[src]
        dense_rows = (~ok).nonzero().squeeze(1)
        if len(dense_rows):
            vals[dense_rows], idx[dense_rows] = self._dense(xc[dense_rows])
        self.stats["rows"] += n
        self.stats["dense_rows"] += len(dense_rows)
        self.stats["candidates"] += len(cols)
        return vals, idx


def _bf16_round_down(t: torch.Tensor) -> torch.Tensor:
    """bf16 values <= t (round to nearest, then one step down where that rounded up)."""
    b = t.bfloat16()
    up = b.float() > t
    if bool(up.any()):
        b = torch.where(up, torch.nextafter(b, torch.tensor(-math.inf, dtype=torch.bfloat16)), b)
    return b
