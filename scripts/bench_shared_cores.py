#!/usr/bin/env python
"""`plmscope build` and `plmscope analyze` alone vs beside one busy CPU-bound process, with plmscope's thread settings
(``plmscope/threads.py``: threads from affinity/cgroup quota, OpenMP sleeping when idle) and with
torch's defaults (torch imported before the CLI entry point, so OpenMP starts with one thread per
installed core and its default spin-waiting).

Each build runs in a fresh process on the same inputs as ``bench_build.py`` (ESM-2 8M architecture,
random weights, a 4,096-latent TopK SAE, ``--proteins`` demo proteins), then ``analyze`` of the
atlas it wrote in another (MMseqs2 clusters, concepts from the build's residue codes, probes,
output effects).  The busy process is a one-thread fp32 matmul loop.  Goal (issue 17): beside one
busy process on N cores a command slows by about its share (ratio near N / (N - 1) once the cores
are full), not by 10x.

    python scripts/bench_shared_cores.py --proteins 200
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import matmul_gflops  # noqa: E402
from bench_build import build_argv, parse_args as build_args, setup  # noqa: E402
from plmscope.threads import SETTINGS  # noqa: E402

BUSY = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"
# torch first: OpenMP reads its environment when torch loads it, before plmscope's entry point runs.
DEFAULTS = "import sys, torch\nfrom plmscope.cli import main\nsys.exit(main(sys.argv[1:]))\n"
OURS = "import sys\nfrom plmscope.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def timed(code: str, argv: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"plmscope {argv[0]} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - t


def timed_build_and_analyze(code: str, argv: list[str], out: Path) -> tuple[float, float]:
    out.unlink(missing_ok=True)
    return timed(code, argv), timed(code, ["analyze", "--atlas", str(out)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--proteins", type=int, default=200)
    p.add_argument("--workdir", help="keep inputs here (default: a temp dir)")
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="plmscope_shared_"))
    work.mkdir(parents=True, exist_ok=True)
    args = build_args(["--proteins", str(a.proteins), "--workdir", str(work)])
    inp = setup(work, a.proteins, args)
    out = work / "shared.duckdb"
    argv = build_argv(inp, out, args)
    timed_build_and_analyze(OURS, argv, out)  # warm the file cache and the import caches
    times = {}
    for busy in (False, True):
        proc = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
        try:
            if proc:
                time.sleep(2)  # let it reach its loop
            for name, code in (("torch defaults", DEFAULTS), ("plmscope threads", OURS)):
                times[(name, busy)] = timed_build_and_analyze(code, argv, out)
        finally:
            if proc:
                proc.kill()
                proc.wait()
    m = matmul_gflops("cpu")
    from plmscope.threads import usable_cpus

    print(f"machine: torch fp32 matmul {m['gflops']:.0f} GFLOP/s ({m['torch_threads']} threads); "
          f"usable CPUs {usable_cpus()}; {a.proteins} proteins")
    for name in ("torch defaults", "plmscope threads"):
        for i, command in enumerate(("build", "analyze")):
            alone, beside = times[(name, False)][i], times[(name, True)][i]
            print(f"{name:<17} {command:<8} alone {alone:6.1f} s, beside one busy process {beside:6.1f} s: "
                  f"ratio {beside / alone:.2f}x")


if __name__ == "__main__":
    main()
