import math

import numpy as np
import pytest
from scipy import sparse

from plmscope.analysis import probes

CLASSES = ["nucleus", "cytoplasm", "membrane"]


def _separable(n=300, d=20, seed=0):
    rng = np.random.default_rng(seed)
    y = np.array(CLASSES * (n // 3), dtype=object)
    mx = rng.random((n, d)) * 0.1
    sm = rng.random((n, d)) * 0.1
    for j, c in enumerate(CLASSES):
        mx[y == c, j] += 3.0  # latent j's max marks class j
    return y, sparse.csr_matrix(mx), sparse.csr_matrix(sm), np.full(n, 100)


def _noisy(n=240, d_sae=12, d_in=5, seed=0):
    """Labels that a linear probe gets partly right (noise on the informative columns), in clusters
    of 3 proteins, so that C matters and the two feature sets disagree on some proteins."""
    rng = np.random.default_rng(seed)
    y = np.array([CLASSES[i % 3] for i in range(n)], dtype=object)
    code = np.array([CLASSES.index(c) for c in y])
    mx = np.abs(rng.normal(0, 1, (n, d_sae)))
    mx[np.arange(n), code] += 1.0
    sm = mx * rng.uniform(5, 20, (n, 1))
    mean = rng.normal(0, 1, (n, d_in))
    mean[np.arange(n), code] += 0.8
    mx_raw = mean + np.abs(rng.normal(0, 1, (n, d_in)))
    groups = [f"c{i // 3}" for i in range(n)]
    return y, (sparse.csr_matrix(mx), sparse.csr_matrix(sm), np.full(n, 50)), (mean, mx_raw), groups


def test_probe_on_separable_labels_is_near_perfect_and_names_the_right_latents():
    y, mx, sm, lengths = _separable()
    d = mx.shape[1]
    X = probes.sae_features(mx, sm, lengths)
    groups = [f"s{i}" for i in range(len(y))]
    train, test = probes.split(y, groups, seed=0)
    assert not set(train) & set(test)
    folds = probes.cv_folds(y[train], [groups[i] for i in train], seed=0)
    res = probes.fit_probe(X, y, train, test, folds, task="location", source="sae", pooling="mean_max")
    assert res.accuracy >= 0.99 and res.macro_f1 >= 0.99
    assert res.C in probes.C_GRID and set(res.cv_accuracy) == set(probes.C_GRID)
    top = probes.top_latents(res, d, active=mx, y=y)
    best = {r["class"]: r for r in top if r["sign"] == "positive" and r["rank"] == 0}
    assert best["nucleus"]["latent"] == 0 and best["nucleus"]["pooling"] == "max"
    assert best["membrane"]["latent"] == 2
    # every latent is active on every protein here: the held-out shares say so
    assert best["nucleus"]["frac_class"] == 1.0 and best["nucleus"]["frac_rest"] == 1.0


def test_top_latents_of_a_mean_pooled_fit_are_all_mean_and_shares_are_held_out_counts():
    y, mx, sm, lengths = _separable()
    d = mx.shape[1]
    mx = mx.tolil()
    mx[:, 0] = 0.0
    mx[np.flatnonzero(y == "nucleus")[::2], 0] = 1.0  # latent 0 active on half the nucleus proteins only
    mx = mx.tocsr()
    sm = sparse.csr_matrix(mx.multiply(50))
    groups = [f"s{i}" for i in range(len(y))]
    train, test = probes.split(y, groups, seed=0)
    folds = probes.cv_folds(y[train], [groups[i] for i in train], seed=0)
    res = probes.fit_probe(probes.sae_features(mx, sm, lengths, pooling="mean"), y, train, test, folds,
                           task="location", source="sae", pooling="mean")
    assert res.n_features == d
    top = probes.top_latents(res, d, active=mx, y=y)
    assert {r["pooling"] for r in top} == {"mean"}
    row = next(r for r in top if r["class"] == "nucleus" and r["latent"] == 0 and r["sign"] == "positive")
    on = np.asarray(mx[test, 0].toarray()).ravel() > 0
    yt = y[test]
    assert row["frac_class"] == pytest.approx(on[yt == "nucleus"].mean())
    assert row["frac_rest"] == pytest.approx(on[yt != "nucleus"].mean()) == 0.0


def test_single_label_filter_and_skip_reason():
    rows, y = probes.single_label([["a"]] * 12 + [["b"]] * 12 + [["a", "b"]] * 5 + [[]] * 3 + [["c"]] * 2)
    assert set(y) == {"a", "b"} and len(rows) == 24
    with pytest.raises(probes.ProbeSkipped, match="fewer than 2 location classes"):
        probes.single_label([[]] * 10)


def test_duplicate_sequences_never_straddle_the_split():
    groups = [f"seq{i // 2}" for i in range(100)]  # pairs of identical sequences
    y = np.array([["a", "b"][(i // 2) % 2] for i in range(100)], dtype=object)
    train, test = probes.split(y, groups, seed=1)
    assert not {groups[i] for i in train} & {groups[i] for i in test}
    # the inner CV folds are grouped too, and cover exactly the training rows
    folds = probes.cv_folds(y[train], [groups[i] for i in train], seed=1)
    g_train = np.array(groups, dtype=object)[train]
    for fit_rows, val_rows in folds:
        assert not set(g_train[fit_rows]) & set(g_train[val_rows])
    assert sorted(np.concatenate([v for _, v in folds]).tolist()) == list(range(len(train)))


def test_probe_cv_never_sees_test_rows():
    """C and the weights come from the training rows alone: replacing every test row's features and
    label by garbage changes the test score and nothing else.  (The check can fail: the same garbage
    in one *training* row changes the CV scores.)"""
    y, sae_in, _, groups = _noisy()
    X = probes.sae_features(*sae_in).toarray()
    train, test = probes.split(y, groups, seed=0)
    folds = probes.cv_folds(y[train], [groups[i] for i in train], seed=0)
    kw = dict(task="location", source="sae", pooling="mean_max", seed=0)
    ref = probes.fit_probe(X, y, train, test, folds, **kw)
    rng = np.random.default_rng(7)
    Xg, yg = X.copy(), y.copy()
    Xg[test] = rng.normal(0, 1e6, (len(test), X.shape[1]))
    yg[test] = rng.choice(CLASSES, len(test))
    got = probes.fit_probe(Xg, yg, train, test, folds, **kw)
    assert got.C == ref.C and got.cv_accuracy == ref.cv_accuracy
    np.testing.assert_array_equal(got.coef, ref.coef)
    assert got.accuracy != ref.accuracy
    Xt = X.copy()
    Xt[train[0]] = rng.normal(0, 1e6, X.shape[1])
    assert probes.fit_probe(Xt, y, train, test, folds, **kw).cv_accuracy != ref.cv_accuracy


def test_sae_and_raw_get_the_same_pooling_and_the_same_rows():
    y, sae_in, raw_in, groups = _noisy()
    pset = probes.run_probes(sae_in, raw_in, y, groups, seed=0)
    feats = {f.features: f for f in pset.fits}
    assert set(feats) == {"sae_mean", "sae_mean_max", "raw_mean", "raw_mean_max"}
    # pooling: mean = one column per latent / dimension; mean_max = mean and max side by side
    assert [feats[k].n_features for k in ("sae_mean", "sae_mean_max", "raw_mean", "raw_mean_max")] == [12, 24, 5, 10]
    np.testing.assert_allclose(probes.sae_features(*sae_in, pooling="mean").toarray(),
                               sae_in[1].toarray() / 50)
    np.testing.assert_array_equal(probes.raw_features(*raw_in, pooling="mean_max"), np.hstack(raw_in))
    # one split for every fit and the baseline
    for f in pset.fits:
        np.testing.assert_array_equal(f.train, pset.baseline.train)
        np.testing.assert_array_equal(f.test, pset.baseline.test)
        assert f.accuracy_ci[0] <= f.accuracy <= f.accuracy_ci[1]
    assert [c.pooling for c in pset.comparisons] == list(probes.POOLINGS)
    for c in pset.comparisons:
        s, r = feats[f"sae_{c.pooling}"], feats[f"raw_{c.pooling}"]
        assert (s.pooling, r.pooling) == (c.pooling, c.pooling)
        assert c.n_sae_only == int((s.correct & ~r.correct).sum()) and c.n_raw_only == int((~s.correct & r.correct).sum())
        assert c.diff == pytest.approx(s.accuracy - r.accuracy)
        assert c.diff_ci[0] <= c.diff <= c.diff_ci[1]
    # without a raw representation only the SAE fits run, and no comparison is made
    alone = probes.run_probes(sae_in, None, y, groups, seed=0, raw_skipped="no embeddings")
    assert [f.features for f in alone.fits] == ["sae_mean", "sae_mean_max"] and not alone.comparisons
    assert alone.raw_skipped == "no embeddings"


def test_mcnemar_is_the_exact_binomial_test_on_discordant_proteins():
    # 20 proteins only A gets right, 12 only B, 50 both, 18 neither (the demo counts)
    a = np.array([1] * 20 + [0] * 12 + [1] * 50 + [0] * 18, bool)
    b = np.array([0] * 20 + [1] * 12 + [1] * 50 + [0] * 18, bool)
    n_a, n_b, p = probes.mcnemar(a, b)
    hand = 2 * sum(math.comb(32, k) for k in range(13)) / 2**32  # two-sided: twice the smaller tail
    assert (n_a, n_b) == (20, 12) and p == pytest.approx(hand, rel=1e-12)
    assert p == pytest.approx(0.215, abs=0.001)
    assert probes.mcnemar(b, a) == (12, 20, pytest.approx(hand, rel=1e-12))
    assert probes.mcnemar(a, a)[2] == 1.0  # no discordant protein
    n_a, n_b, p = probes.mcnemar(np.ones(5, bool), np.zeros(5, bool))
    assert (n_a, n_b) == (5, 0) and p == pytest.approx(2 / 2**5)


def test_majority_baseline_is_the_largest_class_share_of_the_test_set():
    rng = np.random.default_rng(3)
    y = np.array(["a"] * 100 + ["b"] * 60 + ["c"] * 40, dtype=object)
    groups = [f"g{i}" for i in rng.permutation(200) // 2]
    train, test = probes.split(y, groups, seed=0)
    base = probes.majority(y, train, test, task="location")
    labels, counts = np.unique(y[test], return_counts=True)
    assert base.majority_class == "a" == labels[counts.argmax()]
    assert base.accuracy == pytest.approx(counts.max() / len(test))
    # it is the training set's majority that is predicted, whatever the test set holds
    flipped = y.copy()
    flipped[test] = "c"
    assert probes.majority(flipped, train, test, task="location").accuracy == 0.0


def test_bootstrap_resamples_whole_clusters_and_pairs_the_fits():
    # cluster A: 9 proteins all right; cluster B: 1 protein wrong.  Resampling the two clusters can
    # only give accuracy 1 (A, A), 0.9 (A, B) or 0 (B, B); a per-protein bootstrap would give others.
    correct = np.array([True] * 9 + [False])
    groups = ["A"] * 9 + ["B"]
    boots = probes.bootstrap({"x": correct, "same": correct.copy()}, groups, n_boot=500, seed=0)
    assert set(np.round(boots["x"], 9)) <= {1.0, 0.9, 0.0} and len(set(np.round(boots["x"], 9))) == 3
    assert np.array_equal(boots["x"], boots["same"])  # paired: the same resamples for every fit
    lo, hi = probes.interval(boots["x"] - boots["same"])
    assert lo == hi == 0.0
