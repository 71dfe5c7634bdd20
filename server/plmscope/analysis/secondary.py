"""Secondary structure from CA coordinates (P-SEA-style distance rule).

gemmi 0.7 has no DSSP, and many demo structures are CA-only traces, on which DSSP's backbone
H-bond energy cannot be computed anyway.  P-SEA (Labesse et al. 1997) assigns helices and strands
from CA-CA distances alone; we use its distance criteria (without the angle terms):

* helix: d(i,i+2) = 5.5 +/- 0.5, d(i,i+3) = 5.3 +/- 0.5, d(i,i+4) = 6.4 +/- 0.6 A -> residues i..i+4;
* strand: d(i,i+2) = 6.7 +/- 0.6, d(i,i+3) = 9.9 +/- 0.9, d(i,i+4) = 12.4 +/- 1.1 A -> i..i+4.

Windows must be chain-contiguous (consecutive CA-CA < ``MAX_BOND``).  Result: 1-based inclusive
(start, end) segments in the protein's sequence numbering (through the atlas residue map).
"""

from __future__ import annotations

import numpy as np

from ..vocab import FEATURE_NAMES

HELIX = ((5.0, 6.0), (4.8, 5.8), (5.8, 7.0))
STRAND = ((6.1, 7.3), (9.0, 10.8), (11.3, 13.5))
MAX_BOND = 4.2  # CA(i)-CA(i+1) above this: chain break
_NAMES = {"H": FEATURE_NAMES["HELIX"], "E": FEATURE_NAMES["STRAND"]}  # the UniProt features' names


def _ca_trace(pdb_text: str):
    import gemmi

    st = gemmi.read_pdb_string(pdb_text)
    if len(st) == 0:
        return [], np.zeros((0, 3))
    keys, xyz = [], []
    for chain in st[0]:
        for res in chain:
            ca = res.find_atom("CA", "*")
            if ca is not None:
                keys.append((res.seqid.num, res.seqid.icode.strip()))
                xyz.append((ca.pos.x, ca.pos.y, ca.pos.z))
        break  # the stored content is one chain
    return keys, np.asarray(xyz, dtype=np.float64).reshape(-1, 3)


def assign_ca(xyz: np.ndarray) -> np.ndarray:
    """Per-residue label array: 'H', 'E' or '-' for a CA trace (n x 3)."""
    n = len(xyz)
    labels = np.array(["-"] * n)
    if n < 5:
        return labels
    bond = np.linalg.norm(np.diff(xyz, axis=0), axis=1) < MAX_BOND
    for i in range(n - 4):
        if not bond[i : i + 4].all():
            continue
        d = [np.linalg.norm(xyz[i + k] - xyz[i]) for k in (2, 3, 4)]
        for label, ranges in (("H", HELIX), ("E", STRAND)):
            if all(lo <= x <= hi for x, (lo, hi) in zip(d, ranges)):
                labels[i : i + 5] = np.where(labels[i : i + 5] == "-", label, labels[i : i + 5])
    return labels


def segments(pdb_text: str, residue_map: dict[tuple[int, str], int]) -> list[tuple[str, int, int]]:
    """[('helix'|'strand', start, end)] in sequence positions (1-based inclusive)."""
    keys, xyz = _ca_trace(pdb_text)
    labels = assign_ca(xyz)
    out: list[tuple[str, int, int]] = []
    for key, lab in zip(keys, labels):
        pos = residue_map.get(key)
        if pos is None or lab == "-":
            continue
        name = _NAMES[lab]
        if out and out[-1][0] == name and out[-1][2] == pos - 1:
            out[-1] = (name, out[-1][1], pos)
        else:
            out.append((name, pos, pos))
    return out
