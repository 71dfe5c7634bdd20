#!/usr/bin/env python
"""Cost of plmscope's causal tools, as ratios measured in one run on this machine.

* ablation request: ``intervention_effect`` (one latent ablated, wild-type marginals: a clean pass
  through every layer and the head, and the spliced pass resumed from its state at the SAE's layer)
  vs one plain forward (``splice_forward`` without a splice) of the same protein;
* mutation scan: variants/s of ``scan`` (batched) vs ``scan_brute_force`` (one forward per variant),
  both with the model's variant score, on the same residue window; and the seconds a live scan of
  ``--window`` residues takes (what ``Settings.scan_max_window`` is set from).

Models: the demo's UniRep-256 with its committed layer-1 SAE (data/demo/sae/L1-topk512-k32), and a random-weight ESM-2 of
``--arch`` with a random TopK SAE at its middle layer (an architecture costs the same whatever its
weights).  Proteins: real demo proteins of about ``--length`` residues.

    python scripts/bench_causal.py                    # CPU
    python scripts/bench_causal.py --device cuda --arch esm2_t33_650M_UR50D
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import tempfile
import time
from pathlib import Path

import torch

from _machine import matmul_gflops

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"


def protein(length: int) -> str:
    with gzip.open(DEMO / "proteins.tsv.gz", "rt") as fh:
        rows = [r["sequence"] for r in csv.DictReader(fh, delimiter="\t") if set(r["sequence"]) <= set("ACDEFGHIKLMNPQRSTVWY")]
    return min(rows, key=lambda s: abs(len(s) - length))


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def bench(name: str, plm, sae, seq: str, args) -> dict:
    from plmscope.causal.effects import intervention_effect
    from plmscope.causal.intervene import Edit, Intervention
    from plmscope.causal.scan import ScanSettings, scan, scan_brute_force

    with torch.no_grad():
        z = sae.encode(plm.representations([seq], sae.layer)[0].to(plm.device))
        latent = int(z.sum(0).argmax())
        plain = timed(lambda: plm.splice_forward([seq], sae.layer))
        ablate = timed(lambda: intervention_effect(plm, sae, seq, Intervention((Edit(latent, "ablate"),))))
        small = ScanSettings(start=10, end=9 + args.brute_window, token_budget=args.token_budget)
        t_fast = timed(lambda: scan(plm, sae, seq, [latent], small), repeats=1)
        t_slow = timed(lambda: scan_brute_force(plm, sae, seq, [latent], small), repeats=1)
        n_var = 19 * args.brute_window
        live = timed(lambda: scan(plm, sae, seq, [latent], ScanSettings(start=10, end=9 + args.window,
                                                                        token_budget=args.token_budget)), repeats=1)
    return {"model": name, "layer": sae.layer, "length": len(seq), "plain_forward_s": round(plain, 4),
            "ablation_request_s": round(ablate, 4), "ablation_vs_forward": round(ablate / plain, 2),
            "scan_variants_per_s": round(n_var / t_fast, 1), "brute_force_variants_per_s": round(n_var / t_slow, 1),
            "scan_speedup_vs_brute_force": round(t_slow / t_fast, 2),
            f"live_scan_{args.window}_residues_s": round(live, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="esm2_t6_8M_UR50D")
    p.add_argument("--length", type=int, default=300)
    p.add_argument("--window", type=int, default=8, help="residues of the timed live scan")
    p.add_argument("--brute-window", type=int, default=2, help="residues scanned by both paths (19 variants each)")
    p.add_argument("--token-budget", type=int, default=8192)
    p.add_argument("--skip-unirep", action="store_true")
    args = p.parse_args()

    from plmscope.plm.esm2 import ARCHS, ESM2, save_random_esm2
    from plmscope.plm.unirep import UniRep
    from plmscope.sae.io import load_sae
    from plmscope.sae.model import SparseAutoencoder, make_cfg

    seq = protein(args.length)
    print(json.dumps({"machine": matmul_gflops(args.device)}))
    if not args.skip_unirep:
        sae = load_sae(DEMO / "sae" / "L1-topk512-k32").eval()
        plm = UniRep.load(sae.plm, args.device)
        print(json.dumps(bench(sae.plm, plm, sae.to(plm.device), seq, args)))
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_esm2(Path(tmp) / f"{args.arch}.pt", args.arch)
        plm = ESM2.load(str(path), args.device)
        layers, dim, _ = ARCHS[args.arch]
        cfg = make_cfg(plm=str(path), layer=layers // 2, d_in=dim, d_sae=4 * dim, architecture="topk", k=32)
        sae = SparseAutoencoder.from_config(cfg, generator=torch.Generator().manual_seed(0)).eval().to(plm.device)
        print(json.dumps(bench(args.arch + " (random weights)", plm, sae, seq[:1022], args)))


if __name__ == "__main__":
    main()
