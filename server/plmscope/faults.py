"""A test hook: ``PLMSCOPE_FAULT=<point>:<n>`` makes the process SIGKILL itself the ``n``-th time
(1-based) it reaches the named point, so that the fault-injection tests (``tests/atlas/test_faults.py``)
can stop a build, merge, analyze or train-sae at an exact place, as an out-of-memory kill or a
pre-emption would, and check what a rerun with ``--resume`` makes of it.  Unset (always, outside
those tests) it costs one dictionary lookup per point.  The points are listed in docs/atlas.md.

``PLMSCOPE_FAULT_ONCE=<file>`` as well: only the first process to reach the point dies (it creates
``file`` first); a process started again after it (a Ray worker retrying the shard,
``plmscope build --ray``) runs through, as a retried pre-empted worker would.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "PLMSCOPE_FAULT"
ONCE_ENV = "PLMSCOPE_FAULT_ONCE"
_seen: Counter = Counter()


def point(name: str) -> None:
    """Reached the place ``name``: die here if ``PLMSCOPE_FAULT`` says so."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, n = spec.rpartition(":")
    if target != name:
        return
    _seen[name] += 1
    if _seen[name] == int(n):
        once = os.environ.get(ONCE_ENV)
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return  # an earlier process died here already
        os.kill(os.getpid(), signal.SIGKILL)
