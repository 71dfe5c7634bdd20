"""Secondary structure of atlas structures: DSSP where the backbone is complete, a CA rule otherwise.

**DSSP** (Kabsch & Sander 1983; the ``mkdssp`` program, Debian's ``dssp`` package, 4.x) assigns
from backbone H-bonds, so it needs N, CA, C and O.  A chain counts as *full backbone* when at least
``FULL_BACKBONE`` of its CA residues have all four.  Its 8 states are reduced as UniProt reduces
them for its HELIX / STRAND / TURN features: H, G, I -> helix; E, B -> strand; T -> turn (S, P and
coil: nothing).  ``mkdssp`` 4 detects PDB input by a HEADER line and needs a CRYST1 record; the
atlas stores each chain as minimal PDB text (gemmi), so ``run_dssp`` adds both when absent.  Its
classic output is read with Biopython (``Bio.PDB.DSSP.make_dssp_dict``).

**CA rule**, for CA-only traces (where DSSP's H-bond energy cannot be computed) and wherever
``mkdssp`` is not installed: P-SEA (Labesse et al. 1997) assigns helices and strands from CA-CA
distances alone; we use its distance criteria (without the angle terms); it finds no turns:

* helix: d(i,i+2) = 5.5 +/- 0.5, d(i,i+3) = 5.3 +/- 0.5, d(i,i+4) = 6.4 +/- 0.6 A -> residues i..i+4;
* strand: d(i,i+2) = 6.7 +/- 0.6, d(i,i+3) = 9.9 +/- 0.9, d(i,i+4) = 12.4 +/- 1.1 A -> i..i+4.

Windows must be chain-contiguous (consecutive CA-CA < ``MAX_BOND``).  Result: 1-based inclusive
(start, end) segments in the protein's sequence numbering (through the atlas residue map).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..homology import ToolError
from ..vocab import FEATURE_NAMES

log = logging.getLogger(__name__)

HELIX = ((5.0, 6.0), (4.8, 5.8), (5.8, 7.0))
STRAND = ((6.1, 7.3), (9.0, 10.8), (11.3, 13.5))
MAX_BOND = 4.2  # CA(i)-CA(i+1) above this: chain break
_NAMES = {"H": FEATURE_NAMES["HELIX"], "E": FEATURE_NAMES["STRAND"], "T": FEATURE_NAMES["TURN"]}  # UniProt's names
FULL_BACKBONE = 0.9  # share of CA residues with N, CA, C and O for DSSP to be used
DSSP_STATES = {"H": "H", "G": "H", "I": "H", "E": "E", "B": "E", "T": "T"}  # DSSP's 8 states -> UniProt's 3
METHOD_DSSP = "DSSP"  # the annotation label (and the concept source) of each method
METHOD_CA = "CA rule"
_HEADER = "HEADER    PLMSCOPE CHAIN                                                      \n"
_CRYST1 = "CRYST1    1.000    1.000    1.000  90.00  90.00  90.00 P 1           1          \n"


def _ca_trace(pdb_text: str):
    """(residue keys, CA coordinates, share of CA residues with a full backbone) of the first chain."""
    import gemmi

    st = gemmi.read_pdb_string(pdb_text)
    if len(st) == 0:
        return [], np.zeros((0, 3)), 0.0
    keys, xyz, full = [], [], 0
    for chain in st[0]:
        for res in chain:
            ca = res.find_atom("CA", "*")
            if ca is not None:
                keys.append((res.seqid.num, res.seqid.icode.strip()))
                xyz.append((ca.pos.x, ca.pos.y, ca.pos.z))
                full += all(res.find_atom(a, "*") is not None for a in ("N", "C", "O"))
        break  # the stored content is one chain
    return keys, np.asarray(xyz, dtype=np.float64).reshape(-1, 3), full / max(len(keys), 1)


def dssp_executable() -> str | None:
    """``mkdssp``: ``PLMSCOPE_DSSP`` if set, else on PATH; None when neither (the CA rule is used)."""
    named = os.environ.get("PLMSCOPE_DSSP")
    if named:
        if not (os.path.isfile(named) and os.access(named, os.X_OK)):
            raise ToolError(f"PLMSCOPE_DSSP names {named!r}, which is not an executable file")
        return named
    return shutil.which("mkdssp")


MISSING_DSSP = ("mkdssp is not installed, so secondary structure of full-backbone structures falls back to the CA "
                "rule (helix and strand only, no turns). Install DSSP 4 so that 'mkdssp' is on PATH (Debian/Ubuntu: "
                "apt-get install dssp; conda: dssp from conda-forge) or set PLMSCOPE_DSSP to its path.")


def run_dssp(pdb_text: str, exe: str) -> dict[tuple[int, str], str]:
    """DSSP's state per residue (auth number, insertion code) of one chain given as PDB text."""
    from Bio.PDB.DSSP import make_dssp_dict

    lines = pdb_text.splitlines(keepends=True)
    if not any(ln.startswith("CRYST1") for ln in lines):
        lines.insert(0, _CRYST1)
    if not lines or not lines[0].startswith("HEADER"):
        lines.insert(0, _HEADER)
    with tempfile.TemporaryDirectory(prefix="plmscope-dssp-") as tmp:
        src, out = Path(tmp) / "chain.pdb", Path(tmp) / "chain.dssp"
        src.write_text("".join(lines))
        done = subprocess.run([exe, "--output-format", "dssp", str(src), str(out)], capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"mkdssp failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-300:]}")
        states, _ = make_dssp_dict(str(out))
    return {(int(num), icode.strip()): v[1] for (_, (_, num, icode)), v in states.items()}


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


def assign(pdb_text: str, dssp: str | None) -> tuple[str, list[tuple[int, str]], list[str]]:
    """(method, residue keys, per-residue 'H' | 'E' | 'T' | '-'): DSSP when ``dssp`` (the
    ``mkdssp`` path) is given and the chain has a full backbone, else the CA rule."""
    keys, xyz, full = _ca_trace(pdb_text)
    if dssp is not None and full >= FULL_BACKBONE and keys:
        states = run_dssp(pdb_text, dssp)
        return METHOD_DSSP, keys, [DSSP_STATES.get(states.get(k, "-"), "-") for k in keys]
    return METHOD_CA, keys, list(assign_ca(xyz))


def segments(pdb_text: str, residue_map: dict[tuple[int, str], int],
             dssp: str | None = None) -> tuple[str, list[tuple[str, int, int]]]:
    """(method, [('helix'|'strand'|'turn', start, end)]) in sequence positions (1-based inclusive).

    ``dssp``: the ``mkdssp`` path (``dssp_executable()``); None uses the CA rule."""
    method, keys, labels = assign(pdb_text, dssp)
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
    return method, out
