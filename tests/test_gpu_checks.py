"""scripts/gpu_checks.py runs only where a GPU is lent; here its checks run on the CPU, so the
script cannot rot between those sessions (every check compares two real computations)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_checks.py"


def test_gpu_checks_pass_on_the_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_checks", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--device", "cpu", "--arch", "esm2_t6_8M_UR50D", "--n", "3", "--max-len", "150"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok   ") == 15 and "FAIL" not in out and "all GPU checks passed" in out
