#!/usr/bin/env python
"""Correctness of plmscope's CUDA paths, for a session that has a GPU (CI has none).

The test suite holds the CPU paths to fair-esm; this holds the same paths on a CUDA device, on an
ESM-2 architecture with random weights (no download) and real demo proteins of mixed lengths:

1. fp32: plmscope's forward (fused attention, early stop) vs fair-esm's own ``ESM2.forward`` on
   the same device, at every layer: max |difference| (CUDA's kernels differ by a few ulps).
2. bf16 autocast (what ``--device cuda`` runs by default) vs that fp32 reference: per-residue cosine.
3. ``layer_states`` + ``resume_forward`` (output effects, /perturb) vs ``splice_forward`` in one
   pass, with and without a splice, and ``lm_loss`` on CUDA vs on the CPU.
4. the SAE's encode on CUDA vs the CPU (TopK support agreement and values).

Prints one line per check and exits 1 if any is outside its bound.

    python scripts/gpu_checks.py --arch esm2_t12_35M_UR50D
"""

from __future__ import annotations

import argparse
import csv
import gzip
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def demo_sequences(n: int, max_len: int, seed: int) -> list[str]:
    with gzip.open(REPO / "data" / "demo" / "proteins.tsv.gz", "rt") as fh:
        seqs = [r["sequence"] for r in csv.DictReader(fh, delimiter="\t") if 20 <= len(r["sequence"]) <= max_len]
    return random.Random(seed).sample(seqs, n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="esm2_t12_35M_UR50D")
    p.add_argument("--n", type=int, default=12, help="demo proteins, one padded batch")
    p.add_argument("--max-len", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help="cpu runs the same checks (to try the script without a GPU)")
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from plmscope.plm.base import resolve_dtype
    from plmscope.plm.esm2 import ESM2, save_random_esm2
    from plmscope.sae.model import SparseAutoencoder, make_cfg

    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_checks: no CUDA device here; nothing to check", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 comparison is of fp32 arithmetic
    torch.backends.cudnn.allow_tf32 = False
    seqs = demo_sequences(args.n, args.max_len, args.seed)
    failures = []

    def check(name: str, value: float, ok: bool) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {value:.6g}", flush=True)
        if not ok:
            failures.append(name)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_random_esm2(Path(tmp) / f"{args.arch}.pt", args.arch, seed=args.seed)
        fp32 = ESM2.load(str(ckpt), dev, dtype="fp32")
        bf16 = ESM2.load(str(ckpt), dev, dtype="bf16")
        cpu = ESM2.load(str(ckpt), "cpu", dtype="fp32")
    default = resolve_dtype(None, torch.device(dev), args.arch)
    print(f"{args.arch}: {fp32.num_layers} layers, {len(seqs)} proteins of {min(map(len, seqs))}-"
          f"{max(map(len, seqs))} residues; autocast on {dev} by default: {default}", flush=True)
    layers = sorted({0, 1, fp32.num_layers // 2, fp32.num_layers - 1, fp32.num_layers})

    # 1 + 2: against fair-esm's own forward on the same device
    _, _, tokens = fp32.alphabet.get_batch_converter()([("", s) for s in seqs])
    with torch.no_grad():
        ref = fp32.model(tokens.to(dev), repr_layers=layers)["representations"]
    for layer in layers:
        ours = fp32.representations(seqs, layer)
        fast = bf16.representations(seqs, layer)
        diff = max(float((o - ref[layer][b, 1:len(s) + 1].cpu()).abs().max()) for b, (o, s) in enumerate(zip(ours, seqs)))
        scale = max(float(ref[layer][b, 1:len(s) + 1].abs().max()) for b, s in enumerate(seqs))
        check(f"layer {layer} fp32 vs fair-esm, max |diff| relative to max |value| {scale:.3g}", diff / scale, diff / scale <= 1e-4)
        cos = min(float(F.cosine_similarity(f, o, dim=-1).min()) for f, o in zip(fast, ours))
        check(f"layer {layer} bf16 vs fp32, min per-residue cosine", cos, cos >= 0.99)

    # 3: resume from layer states == one spliced pass; lm_loss on cuda == cpu
    mid = fp32.num_layers // 2
    states = fp32.layer_states(seqs, mid)
    scale2 = lambda x: 2.0 * x  # noqa: E731  a splice that changes every residue row
    for splice, label in ((None, "no splice"), (scale2, "rows doubled")):
        one = fp32.splice_forward(seqs, mid, splice)
        resumed = fp32.resume_forward(list(reversed(states)), splice)[::-1]  # another batch order
        diff = max(float((a.logprobs - b.logprobs).abs().max()) for a, b in zip(one, resumed))
        check(f"resume_forward vs splice_forward at layer {mid} ({label}), max |log-prob diff|", diff, diff <= 1e-4)
    gpu_loss, cpu_loss = fp32.lm_loss(seqs, fp32.num_layers), cpu.lm_loss(seqs, cpu.num_layers)
    diff = abs(gpu_loss.mean - cpu_loss.mean)
    check(f"lm_loss {dev} vs cpu ({cpu_loss.mean:.4f} nats/token), |diff|", diff, diff <= 1e-4)

    # 4: SAE encode on both devices
    cfg = make_cfg(plm=str(ckpt), layer=mid, d_in=fp32.model.embed_dim, d_sae=4096, architecture="topk", k=32)
    sae = SparseAutoencoder.from_config(cfg, generator=torch.Generator().manual_seed(0)).eval()
    x = torch.cat(fp32.representations(seqs, mid))
    with torch.no_grad():
        z_cpu = sae.encode(x)
        z_gpu = sae.to(dev).encode(x.to(dev)).cpu()
    agree = float(((z_cpu > 0) & (z_gpu > 0)).sum() / (z_cpu > 0).sum())
    check(f"SAE TopK support agreement {dev} vs cpu", agree, agree >= 0.999)
    diff = float((z_cpu - z_gpu).abs().max() / z_cpu.abs().max())
    check(f"SAE codes {dev} vs cpu, max |diff| relative", diff, diff <= 1e-3)

    print(f"{len(failures)} check(s) failed" if failures else "all GPU checks passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
