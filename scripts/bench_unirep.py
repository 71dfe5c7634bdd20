#!/usr/bin/env python
"""Residues/s of UniRep's forward (all layers) against its FLOP limit, and against the plain Python
step loop it replaced (``python loop`` below, the same equations one torch call at a time), in one run.

FLOPs per residue (2 per multiply-add): per mLSTM layer ``2 * d_in * 5d`` for the input projections
(``wx``: 4d, ``wmx``: d) and ``2 * 5 d^2`` for the recurrent ones (``wmh``: d, ``wh``: 4d); d_in is 10
(the embedding) for layer 1 and d above.  unirep-256: 4.62 MFLOP per residue.  The limit is the
machine's fp32 matmul rate (printed) divided by that; the recurrent products are (B x d) @ (d x 4d)
with B = the batch's sequences, which no BLAS runs at its large-matrix rate.

    python scripts/bench_unirep.py --model unirep-256 --n 64 --token-budget 8192 32768
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import matmul_gflops  # noqa: E402
from bench_representations import DEMO, read_proteins  # noqa: E402


def python_loop(layer, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The step loop before issue 17 (unirep.py at 6aade38), for the before/after ratio."""
    B, T, _ = x.shape
    xm = x @ layer.wmx
    xz = x @ layer.wx + layer.b
    h = x.new_zeros(B, layer.d)
    c = x.new_zeros(B, layer.d)
    out = x.new_empty(B, T, layer.d)
    for t in range(T):
        m = xm[:, t] * (h @ layer.wmh)
        i, f, o, u = (xz[:, t] + m @ layer.wh).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        keep = valid[:, t, None]
        c = torch.where(keep, c_new, c)
        h = torch.where(keep, h_new, h)
        out[:, t] = h
    return out


def flops_per_residue(plm) -> float:
    total = 0.0
    for i, layer in enumerate(plm.layers):
        d_in, d = layer.wx.shape[0], layer.d
        total += 2 * d_in * 5 * d + 2 * 5 * d * d
    return total


def run_pass(plm, seqs, budget: int) -> float:
    items = [(str(i), s) for i, s in enumerate(seqs)]
    t = time.perf_counter()
    n = sum(1 for _ in plm.iter_layer_representations(items, [plm.num_layers], token_budget=budget, sort_window=len(items)))
    assert n == len(seqs)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="unirep-256")
    p.add_argument("--n", type=int, default=64, help="demo proteins")
    p.add_argument("--max-len", type=int, default=600)
    p.add_argument("--token-budget", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the fastest counts")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from plmscope.plm.base import load_plm
    from plmscope.plm import unirep

    plm = load_plm(a.model, "cpu")
    seqs = read_proteins(DEMO, a.n, a.max_len)
    residues = sum(map(len, seqs))
    fpr = flops_per_residue(plm)
    scripted = unirep._MLSTMLayer.forward
    run_pass(plm, seqs[:4], 4096)  # warm-up (scripting, allocations)
    best: dict[tuple[str, int], float] = {}
    for _ in range(a.repeats):
        for budget in a.token_budget:
            for name, fwd in (("python loop", python_loop), ("scripted", scripted)):
                unirep._MLSTMLayer.forward = fwd
                try:
                    t = run_pass(plm, seqs, budget)
                finally:
                    unirep._MLSTMLayer.forward = scripted
                best[(name, budget)] = min(best.get((name, budget), float("inf")), t)
    m = matmul_gflops("cpu")
    limit = m["gflops"] * 1e9 / fpr
    print(f"{a.model}: {len(seqs)} proteins, {residues} residues, all {plm.num_layers} layers, "
          f"{fpr / 1e6:.2f} MFLOP/residue; torch threads {torch.get_num_threads()}")
    print(f"machine: torch fp32 matmul {m['gflops']:.0f} GFLOP/s -> FLOP limit {limit:,.0f} residues/s")
    for budget in a.token_budget:
        before, after = best[("python loop", budget)], best[("scripted", budget)]
        print(f"token budget {budget:>6}: python loop {residues / before:8,.0f} res/s ({100 * residues / before / limit:4.1f}% of limit), "
              f"scripted {residues / after:8,.0f} res/s ({100 * residues / after / limit:4.1f}%): {before / after:.2f}x")


if __name__ == "__main__":
    main()
