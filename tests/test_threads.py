"""Thread counts come from the CPUs the process may use, and OpenMP sleeps instead of spinning
(issue 17: oversubscribed shared cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from plmscope import threads

# The real entry point parses `train-sae --help` (which imports torch after main() prepared the
# environment), then reports what torch and OpenMP were started with.
PROBE = """
import json, os, sys
from plmscope import cli
try:
    cli.main(["train-sae", "--help"])
except SystemExit:
    pass
import torch
print(json.dumps({"torch": torch.get_num_threads(), "policy": os.environ.get("OMP_WAIT_POLICY"),
                  "omp": os.environ.get("OMP_NUM_THREADS"), "affinity": len(os.sched_getaffinity(0))}))
"""


def _probe(env_extra: dict, cpus: set[int] | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in threads.SETTINGS}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120,
                         preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_cli_threads_follow_affinity_and_sleep_when_idle():
    one = {sorted(os.sched_getaffinity(0))[0]}
    got = _probe({}, one)
    assert got == {"torch": 1, "policy": "PASSIVE", "omp": "1", "affinity": 1}
    every = _probe({}, None)
    assert every["torch"] == threads.usable_cpus() and every["policy"] == "PASSIVE"


@pytest.mark.skipif(threads.usable_cpus() < 2, reason="needs 2 usable CPUs to tell a kept setting from the default")
def test_user_settings_are_kept():
    got = _probe({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}, None)
    assert got["torch"] == 1 and got["policy"] == "ACTIVE"


def test_cgroup_quota_caps_the_count(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # cgroup v2: 1.5 CPUs
    assert threads.cgroup_cpu_limit(tmp_path) == 1.5
    assert threads.usable_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert threads.usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert threads.cgroup_cpu_limit(v1) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert threads.cgroup_cpu_limit(v1) is None


def test_set_torch_threads_reads_back():
    import torch

    before = torch.get_num_threads()
    try:
        assert threads.set_torch_threads(1) == 1
        assert threads.set_torch_threads(0) == 1  # never below one
    finally:
        torch.set_num_threads(before)


def test_default_threads_prefers_the_environment():
    assert threads.default_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert threads.default_threads({}) == threads.usable_cpus()
    assert threads.default_threads({"OMP_NUM_THREADS": "x"}) == threads.usable_cpus()


def test_torch_threads_sets_the_block_and_restores_even_on_error():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threads.torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            with threads.torch_threads(1):
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
