"""Activation pattern of a latent, read off its top examples.

Categories (``PATTERNS``): ``dead``, ``point``, ``short_motif``, ``long_motif``, ``periodic``,
``whole``.  Each top example (one protein's per-residue activation vector) is classified on its
own, then the latent takes the most common category among its examples (ties go to the earlier
category in ``VOTE_ORDER``).  Per example:

1. *active residues*: activation > ``ACTIVE_FRACTION`` x the example's maximum.  Relative to the
   example's own maximum so that the shape, not the strength, decides; weak tails do not count.
2. *runs*: maximal stretches of consecutive active residues.
3. ``whole``     - active residues cover >= ``WHOLE_COVERAGE`` of the protein.
4. ``periodic``  - >= ``PERIODIC_MIN_RUNS`` short runs (each <= ``PERIODIC_MAX_RUN`` residues)
   whose consecutive start-to-start spacings fall in ``PERIOD_RANGE`` (3-4 residues, the
   alpha-helix repeat of 3.6) for >= ``PERIODIC_MIN_FRACTION`` of the spacings.
5. ``point``     - every run is <= ``POINT_MAX_RUN`` residues (isolated residues, e.g. a
   catalytic residue or cysteines), whatever their number.
6. otherwise runs are merged across gaps of <= ``MERGE_GAP`` residues (activation dipping inside
   a motif or domain should not split it) and the longest merged segment decides:
   <= ``SHORT_MOTIF_MAX`` residues -> ``short_motif``, longer -> ``long_motif`` (domain-sized).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import numpy as np

PATTERNS = ("dead", "point", "short_motif", "long_motif", "periodic", "whole")

ACTIVE_FRACTION = 0.2  # residue active when > 20 % of the example's maximum
WHOLE_COVERAGE = 0.6  # >= 60 % of residues active -> whole protein
PERIODIC_MIN_RUNS = 4  # at least 4 repeats before calling anything periodic
PERIODIC_MAX_RUN = 2  # a periodic repeat is 1-2 residues (one face of a helix)
PERIOD_RANGE = (3, 4)  # start-to-start spacing of consecutive repeats, residues (helix: 3.6)
PERIODIC_MIN_FRACTION = 0.7  # of the spacings inside PERIOD_RANGE
POINT_MAX_RUN = 2  # single residues (or a pair)
MERGE_GAP = 3  # gaps of <= 3 inactive residues do not split a motif / domain
SHORT_MOTIF_MAX = 20  # merged segment <= 20 residues: motif; longer: domain-sized "long motif"

# Tie-break for the vote: the more specific category wins.
VOTE_ORDER = ("periodic", "point", "short_motif", "long_motif", "whole")


def runs(mask: np.ndarray) -> np.ndarray:
    """(n_runs, 2) array of [start, end) index pairs of consecutive True values."""
    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return edges.reshape(-1, 2)


def _merge(r: np.ndarray, gap: int) -> np.ndarray:
    if len(r) == 0:
        return r
    merged = [list(r[0])]
    for s, e in r[1:]:
        if s - merged[-1][1] <= gap:
            merged[-1][1] = e
        else:
            merged.append([s, e])
    return np.asarray(merged)


def classify_example(act: Sequence[float] | np.ndarray) -> str | None:
    """Category of one activation vector; None when it is all zero (no evidence)."""
    a = np.asarray(act, dtype=np.float32)
    peak = float(a.max()) if a.size else 0.0
    if peak <= 0:
        return None
    mask = a > ACTIVE_FRACTION * peak
    n_active = int(mask.sum())
    if n_active >= WHOLE_COVERAGE * a.size:
        return "whole"
    r = runs(mask)
    lengths = r[:, 1] - r[:, 0]
    if len(r) >= PERIODIC_MIN_RUNS and lengths.max() <= PERIODIC_MAX_RUN:
        spacing = np.diff(r[:, 0])
        in_range = (spacing >= PERIOD_RANGE[0]) & (spacing <= PERIOD_RANGE[1])
        if in_range.mean() >= PERIODIC_MIN_FRACTION:
            return "periodic"
    if lengths.max() <= POINT_MAX_RUN:
        return "point"
    segments = _merge(r, MERGE_GAP)
    longest = int((segments[:, 1] - segments[:, 0]).max())
    return "short_motif" if longest <= SHORT_MOTIF_MAX else "long_motif"


def classify_latent(examples: Iterable[np.ndarray], is_dead: bool = False) -> tuple[str, dict[str, int]]:
    """(pattern, votes) for one latent from its top examples' activation vectors."""
    if is_dead:
        return "dead", {}
    votes = Counter(c for c in (classify_example(x) for x in examples) if c is not None)
    if not votes:
        return "dead", {}
    best = max(votes.values())
    pattern = next(c for c in VOTE_ORDER if votes.get(c, 0) == best)
    return pattern, dict(votes)
