"""How many CPU threads plmscope computes with, chosen in one place.

torch and OpenMP default to one thread per *installed* core and spin-wait between parallel
regions.  In a container limited to part of the machine (CPU affinity, cgroup quota) or beside
another CPU-bound process, that oversubscribes the cores: every parallel region waits for its
slowest thread, and spinning threads burn the time the other process needed (issue 17: an
`analyze` that took 81 s alone took over 10 minutes beside one busy process on 2 cores).

So the command-line entry point calls ``prepare_environment()`` before anything imports torch:

* ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` default to ``usable_cpus()``: the CPUs this process may
  run on (``os.sched_getaffinity``) capped by the cgroup CPU quota (``cpu.max`` of cgroup v2, or
  ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of v1), rounded up;
* ``OMP_WAIT_POLICY=PASSIVE`` (and ``KMP_BLOCKTIME=0`` for Intel's OpenMP): idle OpenMP threads
  sleep instead of spinning.  OpenMP reads these once, when torch first starts it, so setting
  them later has no effect.  No short spin first (``GOMP_SPINCOUNT``): the build and the server
  run several OpenMP teams, for which GNU OpenMP does not spin anyway, and beside a busy process
  a 0.1 ms spin made ``analyze`` 1.25x slower (``scripts/bench_shared_cores.py``).

Values the user already set are kept.  ``set_torch_threads`` applies a count to an already
imported torch (the web server's inference thread uses it for its own thread count).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# what prepare_environment sets unless the user did (benchmarks clear them to start from defaults)
SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup quota allows (e.g. 1.5), or None when unlimited or unreadable."""
    try:
        text = (root / "cpu.max").read_text().split()  # v2: "max 100000" or "150000 100000"
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:  # v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity set, capped by the cgroup quota (at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        n = min(n, math.ceil(limit))
    return max(n, 1)


def default_threads(environ=os.environ) -> int:
    """``OMP_NUM_THREADS`` where set (by the user, or by ``prepare_environment``), else ``usable_cpus()``."""
    try:
        return max(int(environ.get("OMP_NUM_THREADS", "")), 1)
    except ValueError:
        return usable_cpus()


def prepare_environment(environ=os.environ) -> int:
    """Thread defaults for torch/OpenMP/MKL, before torch is imported; returns the thread count."""
    n = usable_cpus()
    environ.setdefault("OMP_NUM_THREADS", str(n))
    environ.setdefault("MKL_NUM_THREADS", environ["OMP_NUM_THREADS"])
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    environ.setdefault("KMP_BLOCKTIME", "0")
    return default_threads(environ)


def set_torch_threads(n: int) -> int:
    """``torch.set_num_threads(n)`` for the calling thread's parallel regions (at least 1)."""
    import torch

    n = max(int(n), 1)
    torch.set_num_threads(n)
    return torch.get_num_threads()


@contextmanager
def torch_threads(n: int):
    """The calling thread's torch threads set to ``n`` inside the block, then restored.

    For work of many small parallel regions (UniRep's recurrent steps): with several OpenMP teams
    in a process (the build's forward and SAE threads, the server's workers) GNU OpenMP counts
    more threads than cores and stops spinning altogether, and every region then pays a
    futex wake-up.  torch also takes the count as the default of threads that have not yet run a
    parallel op, so threads running torch ops beside such a block set their own count first
    (``set_torch_threads``: the build's SAE thread, the server's workers)."""
    import torch

    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
