"""The machine's matmul rate, printed beside every benchmark's timings.

The machines these benchmarks run on are shared and noisy: a ratio measured in one run is
comparable across days, an absolute time is not unless the matmul rate of that moment is known.
"""

from __future__ import annotations

import os
import time


def matmul_gflops(device: str = "cpu", n: int | None = None, dtype: str = "fp32", repeats: int = 5) -> dict:
    """Median GFLOP/s of an ``n x n x n`` torch matmul on ``device`` (2 n^3 FLOPs per product)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    n = n or (8192 if device.startswith("cuda") else 1024)
    gen = torch.Generator(device=device).manual_seed(0)
    # random operands: zeros run faster than real data on some hardware
    a = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dt, generator=gen)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):
        a @ b
    sync()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync()
        rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
    rates.sort()
    return {"device": device, "dtype": dtype, "n": n, "gflops": round(rates[len(rates) // 2], 1),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
