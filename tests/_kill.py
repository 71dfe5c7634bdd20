"""Run a plmscope command in a subprocess that SIGKILLs itself at a named point
(``PLMSCOPE_FAULT=<point>:<n>``, see ``plmscope.faults``), as an out-of-memory kill or a
pre-emption would stop it."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests._paths import REPO

MAIN = "import sys; from plmscope.cli import main; sys.exit(main(sys.argv[1:]))"


def run_cli(argv: list[str], *, fault: str | None = None, preexec_fn=None, timeout: float = 300) -> subprocess.CompletedProcess:
    import torch

    # the child computes with as many threads as this process: a result compared bit for bit with
    # one computed here (train-sae resumed in-process) must not differ by BLAS reduction order
    threads = str(torch.get_num_threads())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "server"), str(REPO)]),
               OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env.pop("PLMSCOPE_FAULT", None)
    if fault:
        env["PLMSCOPE_FAULT"] = fault
    return subprocess.run([sys.executable, "-c", MAIN, *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn)


def run_killed(argv: list[str], fault: str) -> subprocess.CompletedProcess:
    """The command, killed at ``fault``; fails the test if it got through without reaching it."""
    proc = run_cli(argv, fault=fault)
    assert proc.returncode == -signal.SIGKILL, (
        f"{fault}: expected the command to be killed there, it exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def plain_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def mode(path: Path) -> int:
    return Path(path).stat().st_mode & 0o777
