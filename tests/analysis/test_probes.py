import numpy as np
import pytest
from scipy import sparse

from plmscope.analysis import probes


def test_probe_on_separable_labels_is_near_perfect_and_names_the_right_latents():
    rng = np.random.default_rng(0)
    n, d = 300, 20
    y = np.array(["nucleus", "cytoplasm", "membrane"] * (n // 3), dtype=object)
    mx = rng.random((n, d)) * 0.1
    sm = rng.random((n, d)) * 0.1
    for j, c in enumerate(["nucleus", "cytoplasm", "membrane"]):
        mx[y == c, j] += 3.0  # latent j's max marks class j
    X = probes.sae_features(sparse.csr_matrix(mx), sparse.csr_matrix(sm), np.full(n, 100))
    train, test = probes.split(y, [f"s{i}" for i in range(n)], seed=0)
    assert not set(train) & set(test)
    res = probes.fit_probe(X, y, train, test, task="location", features="sae_mean_max")
    assert res.accuracy >= 0.99 and res.macro_f1 >= 0.99
    top = probes.top_latents(res, d)
    best = {r["class"]: r for r in top if r["sign"] == "positive" and r["rank"] == 0}
    assert best["nucleus"]["latent"] == 0 and best["nucleus"]["pooling"] == "max"
    assert best["membrane"]["latent"] == 2


def test_single_label_filter_and_skip_reason():
    rows, y = probes.single_label([["a"]] * 12 + [["b"]] * 12 + [["a", "b"]] * 5 + [[]] * 3 + [["c"]] * 2)
    assert set(y) == {"a", "b"} and len(rows) == 24
    with pytest.raises(probes.ProbeSkipped, match="fewer than 2 location classes"):
        probes.single_label([[]] * 10)


def test_duplicate_sequences_never_straddle_the_split():
    y = np.array(["a", "b"] * 50, dtype=object)
    groups = [f"seq{i // 2}" for i in range(100)]  # pairs of identical sequences
    y = np.array([["a", "b"][(i // 2) % 2] for i in range(100)], dtype=object)
    train, test = probes.split(y, groups, seed=1)
    assert not {groups[i] for i in train} & {groups[i] for i in test}
