"""Linear probes for protein-level labels: SAE latents vs the raw pLM representation, compared fairly.

Task ``location``: the corpus's subcellular location classes.  Proteins with exactly one class
are used as a single-label multiclass problem (multi-location proteins are left out rather than
turned into one-vs-rest tasks, so accuracy is comparable with InterProt's single-label probe);
classes with fewer than ``MIN_CLASS_PROTEINS`` such proteins are dropped.

What makes the comparison fair:

* **Same pooling on both sides.**  Each feature set is pooled ``mean`` (per dimension, the mean
  over residues) and ``mean_max`` (mean and max side by side), so there are four fits per task:
  ``sae_mean`` (d_sae columns, from ``protein_latent_stats``' sum / length), ``sae_mean_max``
  (2 x d_sae, plus its max), ``raw_mean`` (d_in, ``protein_embeddings.mean_rep``) and
  ``raw_mean_max`` (2 x d_in, plus ``max_rep``).  SAE and raw are compared only at equal pooling.
* **The same train / test rows for every fit**, split once by sklearn's ``StratifiedGroupKFold``
  (first of ``TEST_FOLDS`` folds is the test set): classes keep their proportions and a group
  (analyze passes each protein's MMseqs2 cluster) is never on both sides.
* **Regularisation chosen inside the training rows, per fit.**  ``C`` is picked from ``C_GRID`` by
  cross-validation over a ``StratifiedGroupKFold`` of the *training rows only* (grouped by the same
  clusters; the same folds for every fit); the scaler is fitted on each inner fitting fold.  The
  test rows reach neither the CV nor the refit on all training rows.
* **Baselines and uncertainty.**  The majority-class baseline (always the training set's most
  frequent class); 95 % intervals on every accuracy and on the paired SAE - raw difference from a
  bootstrap over *test clusters* (homologues are resampled together, as they are not independent);
  and McNemar's exact test on the proteins one fit gets right and the other wrong.

Weights are on standardised features, so their sizes compare; ``top_latents`` lists each class's
largest positive and negative latent weights with how often the latent is active on held-out
proteins of the class and of the other classes (the atlas's own evidence for each latent, its
description, family, concept and density, is joined where it is shown).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import sparse
from scipy.stats import binomtest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ..errors import PlmscopeError

MIN_CLASS_PROTEINS = 10
TEST_FOLDS = 5  # 1 of 5 folds -> 20 % test
CV_FOLDS = 3  # inner folds of the training rows that choose C
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # inverse L2 strength on standardised features
MAX_ITER = 1000
DENSE_BYTES = 1 << 30
N_BOOT = 2000
CI_LEVEL = 0.95
TOP_LATENTS = 10  # per class and sign
POOLINGS = ("mean", "mean_max")
SOURCES = ("sae", "raw")
POOLING_LABELS = {"mean": "mean", "mean_max": "mean + max"}


class ProbeSkipped(PlmscopeError):
    """The atlas lacks what a probe needs; the message is the stated reason."""


@dataclass
class ProbeResult:
    task: str
    source: str  # 'sae' | 'raw' | 'majority'
    pooling: str | None  # 'mean' | 'mean_max'; None for the majority baseline
    accuracy: float
    macro_f1: float
    n_train: int
    n_test: int
    n_features: int
    classes: list[str]
    coef: np.ndarray | None  # (n_classes, n_features) on standardised features; None for the baseline
    C: float | None = None  # chosen by the inner CV
    cv_accuracy: dict[float, float] = field(default_factory=dict)  # mean inner-CV accuracy per C
    correct: np.ndarray | None = None  # bool per test row (in ``test`` order)
    train: np.ndarray | None = None
    test: np.ndarray | None = None
    accuracy_ci: tuple[float, float] | None = None  # set by ``bootstrap``
    majority_class: str | None = None  # the baseline's class
    top: list[dict] = field(default_factory=list)  # ``top_latents`` rows (SAE fits, set by analyze)

    @property
    def features(self) -> str:
        return "majority" if self.source == "majority" else f"{self.source}_{self.pooling}"


@dataclass
class Comparison:
    """SAE vs raw at one pooling, on the same test proteins."""

    task: str
    pooling: str
    sae_accuracy: float
    raw_accuracy: float
    diff: float  # SAE - raw
    diff_ci: tuple[float, float]
    n_sae_only: int  # test proteins the SAE probe gets right and the raw probe wrong
    n_raw_only: int
    mcnemar_p: float  # exact two-sided binomial test on the discordant proteins


def single_label(labels: Sequence[Sequence[str]], min_class: int = MIN_CLASS_PROTEINS) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, class labels) of proteins with exactly one class among kept classes."""
    single = [(i, ls[0]) for i, ls in enumerate(labels) if len(ls) == 1]
    counts: dict[str, int] = {}
    for _, c in single:
        counts[c] = counts.get(c, 0) + 1
    keep = {c for c, n in counts.items() if n >= min_class}
    if len(keep) < 2:
        raise ProbeSkipped(
            f"fewer than 2 location classes with >= {min_class} single-location proteins "
            f"(classes found: {dict(sorted(counts.items())) or 'none'})"
        )
    rows = [(i, c) for i, c in single if c in keep]
    return np.array([i for i, _ in rows]), np.array([c for _, c in rows], dtype=object)


def _group_ids(groups: Sequence[str]) -> list[str]:
    # hashed, so which groups land together depends on the seed only, not on accession order
    return [hashlib.sha256(str(g).encode()).hexdigest() for g in groups]


def split(y: np.ndarray, groups: Sequence[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train / test indices: stratified by class, grouped (analyze passes MMseqs2 clusters)."""
    n_splits = int(min(TEST_FOLDS, np.unique(y, return_counts=True)[1].min()))
    if n_splits < 2:
        raise ProbeSkipped("a class has fewer than 2 proteins; cannot hold out a test set")
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train, test = next(cv.split(np.zeros(len(y)), y, _group_ids(groups)))
    return train, test


def cv_folds(y_train: np.ndarray, groups_train: Sequence[str], seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inner (fit, validation) folds over the training rows only (positions within them), stratified
    and grouped like the outer split.  Every fit of a comparison gets the same folds."""
    n_splits = int(min(CV_FOLDS, np.unique(y_train, return_counts=True)[1].min()))
    if n_splits < 2:
        raise ProbeSkipped("a class has fewer than 2 training proteins; cannot cross-validate C")
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + 1)
    return list(cv.split(np.zeros(len(y_train)), y_train, _group_ids(groups_train)))


def _design(X):
    """Features as the solver gets them, float32 (the atlas stores them so; the fits take about
    half as long as in float64, with the same chosen C on the demo).  SAE pooled latents are
    sparse, but on real proteins dense enough (~half non-zero on the demo) that sparse products are
    several times slower than dense ones: dense unless that would take more than ``DENSE_BYTES``."""
    if sparse.issparse(X):
        if X.nnz > 0.05 * X.shape[0] * X.shape[1] and X.shape[0] * X.shape[1] * 4 <= DENSE_BYTES:
            return X.toarray().astype(np.float32, copy=False)
        return sparse.csr_matrix(X, dtype=np.float32)
    return np.asarray(X, dtype=np.float32)


def _scaler(X) -> StandardScaler:
    # Sparse features are scaled without centring (keeps them sparse; LR fits the intercept).
    return StandardScaler(with_mean=not sparse.issparse(X))


def _model(C: float, seed: int, warm: bool = False) -> LogisticRegression:
    return LogisticRegression(C=C, max_iter=MAX_ITER, random_state=seed, warm_start=warm)


def choose_c(X_train, y_train: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], seed: int = 0) -> tuple[float, dict[float, float]]:
    """(chosen C, mean validation accuracy per C) by CV over ``folds`` of the *training rows* given.

    Each fold's scaler is fitted on its fitting part only.  Along ``C_GRID`` (strongest
    regularisation first) each fit starts from the previous C's solution, as LogisticRegressionCV
    does: the same optimum, reached in far fewer iterations.  Ties go to the smaller C."""
    scores = np.zeros((len(folds), len(C_GRID)))
    for k, (fit_rows, val_rows) in enumerate(folds):
        scaler = _scaler(X_train).fit(X_train[fit_rows])
        Xf, Xv = scaler.transform(X_train[fit_rows]), scaler.transform(X_train[val_rows])
        lr = _model(C_GRID[0], seed, warm=True)
        for j, c in enumerate(C_GRID):
            lr.set_params(C=c).fit(Xf, y_train[fit_rows])
            scores[k, j] = accuracy_score(y_train[val_rows], lr.predict(Xv))
    mean = scores.mean(axis=0)
    return float(C_GRID[int(np.argmax(mean))]), {float(c): float(m) for c, m in zip(C_GRID, mean)}


def fit_probe(X, y: np.ndarray, train: np.ndarray, test: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], *,
              task: str, source: str, pooling: str, seed: int = 0) -> ProbeResult:
    """L2 multinomial logistic regression on standardised ``X``, ``C`` chosen by ``choose_c`` on
    ``folds`` (positions within ``train``); refitted on all of ``train`` with that C, scored on ``test``.

    Only ``X[train]`` / ``y[train]`` are handed to the choice of C: the test rows cannot influence it."""
    X = _design(X)
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        # The weakest regularisation may stop at MAX_ITER on separable folds; the CV judges it as it is.
        warnings.simplefilter("ignore", ConvergenceWarning)
        # One BLAS thread: the matrices are small, and on a busy machine spinning BLAS threads made
        # these fits 10-100x slower (measured: 14 s vs 0.1 s for one raw fit under load).
        C, cv_acc = choose_c(X[train], y[train], folds, seed)
        scaler = _scaler(X).fit(X[train])
        lr = _model(C, seed).fit(scaler.transform(X[train]), y[train])
        pred = lr.predict(scaler.transform(X[test]))
    classes = [str(c) for c in lr.classes_]
    coef = lr.coef_ if len(classes) > 2 else np.vstack([-lr.coef_[0], lr.coef_[0]])
    return ProbeResult(
        task=task, source=source, pooling=pooling,
        accuracy=float(accuracy_score(y[test], pred)),
        macro_f1=float(f1_score(y[test], pred, average="macro")),
        n_train=len(train), n_test=len(test), n_features=int(X.shape[1]), classes=classes, coef=coef,
        C=C, cv_accuracy=cv_acc,
        correct=np.asarray(pred == y[test]), train=np.asarray(train), test=np.asarray(test),
    )


def majority(y: np.ndarray, train: np.ndarray, test: np.ndarray, *, task: str) -> ProbeResult:
    """Always predict the training rows' most frequent class (ties: the first in sorted order).  On a
    stratified split this is the largest class's share of the test set."""
    classes, counts = np.unique(y[train], return_counts=True)
    cls = classes[int(np.argmax(counts))]
    pred = np.full(len(test), cls, dtype=object)
    return ProbeResult(
        task=task, source="majority", pooling=None,
        accuracy=float(accuracy_score(y[test], pred)),
        macro_f1=float(f1_score(y[test], pred, average="macro", labels=np.unique(y[test]))),
        n_train=len(train), n_test=len(test), n_features=0, classes=[str(c) for c in classes], coef=None,
        correct=np.asarray(pred == y[test]), train=np.asarray(train), test=np.asarray(test),
        majority_class=str(cls),
    )


def sae_features(max_act: sparse.csr_matrix, sum_act: sparse.csr_matrix, lengths: np.ndarray,
                 pooling: str = "mean_max") -> sparse.csr_matrix:
    """Mean pooling (latent j -> column j) and, for ``mean_max``, max pooling (column d_sae + j)."""
    mean = sparse.diags(1.0 / np.maximum(np.asarray(lengths, np.float64), 1)) @ sum_act
    if pooling == "mean":
        return sparse.csr_matrix(mean)
    return sparse.hstack([mean, max_act], format="csr")


def raw_features(mean_rep: np.ndarray, max_rep: np.ndarray, pooling: str = "mean_max") -> np.ndarray:
    """The raw representation pooled as ``sae_features`` pools latents: [mean] or [mean | max]."""
    return mean_rep if pooling == "mean" else np.hstack([mean_rep, max_rep])


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> tuple[int, int, float]:
    """(a right & b wrong, a wrong & b right, exact two-sided p): under the null each discordant
    protein is a fair coin, so the p-value is the binomial test of one count among their sum."""
    a, b = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    n_a, n_b = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if n_a + n_b == 0 else float(binomtest(n_a, n_a + n_b, 0.5).pvalue)
    return n_a, n_b, p


def bootstrap(correct: dict[str, np.ndarray], groups_test: Sequence[str], *, n_boot: int = N_BOOT,
              seed: int = 0) -> dict[str, np.ndarray]:
    """Accuracy of each fit on ``n_boot`` resamples of the test set, drawn by cluster: each
    resample draws as many clusters as there are, with replacement, and takes all their proteins.
    The same resamples serve every fit, so differences are paired.  (fit name -> n_boot accuracies)"""
    _, gidx = np.unique(np.asarray(groups_test, dtype=object).astype(str), return_inverse=True)
    n_groups = int(gidx.max()) + 1
    size = np.bincount(gidx, minlength=n_groups).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot).astype(np.float64)
    n = draws @ size
    return {name: draws @ np.bincount(gidx, weights=np.asarray(c, np.float64), minlength=n_groups) / n
            for name, c in correct.items()}


def interval(samples: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap samples."""
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass
class ProbeSet:
    """All of one task's probes: the four fits, the baseline and the paired comparisons."""

    fits: list[ProbeResult]  # every fit that ran, SAE first
    baseline: ProbeResult
    comparisons: list[Comparison]
    raw_skipped: str | None  # why the raw fits did not run, if they did not
    n_test_clusters: int
    folds: list[tuple[np.ndarray, np.ndarray]]  # the inner CV folds (positions within train)

    def fit(self, features: str) -> ProbeResult | None:
        return next((f for f in self.fits if f.features == features), None)


def run_probes(sae_inputs: tuple[sparse.csr_matrix, sparse.csr_matrix, np.ndarray],
               raw_inputs: tuple[np.ndarray, np.ndarray] | None, y: np.ndarray, groups: Sequence[str], *,
               task: str = "location", seed: int = 0, raw_skipped: str | None = None,
               on_fit: Callable[[ProbeResult], None] | None = None) -> ProbeSet:
    """Fit SAE and raw probes at each pooling on one split, the baseline, and compare at equal pooling.

    ``sae_inputs``: (max, sum, lengths) rows aligned with ``y``; ``raw_inputs``: (mean_rep, max_rep)
    likewise, or None (``raw_skipped`` says why)."""
    groups = np.asarray(groups, dtype=object)
    train, test = split(y, groups.tolist(), seed=seed)
    folds = cv_folds(y[train], groups[train].tolist(), seed=seed)
    fits = []
    for source in SOURCES:
        if source == "raw" and raw_inputs is None:
            continue
        for pooling in POOLINGS:
            X = sae_features(*sae_inputs, pooling=pooling) if source == "sae" else raw_features(*raw_inputs, pooling=pooling)
            fits.append(fit_probe(X, y, train, test, folds, task=task, source=source, pooling=pooling, seed=seed))
            if on_fit:
                on_fit(fits[-1])
    base = majority(y, train, test, task=task)
    boots = bootstrap({f.features: f.correct for f in fits + [base]}, groups[test].tolist(), seed=seed)
    for f in fits + [base]:
        f.accuracy_ci = interval(boots[f.features])
    comparisons = []
    by = {f.features: f for f in fits}
    for pooling in POOLINGS:
        s, r = by.get(f"sae_{pooling}"), by.get(f"raw_{pooling}")
        if s is None or r is None:
            continue
        n_s, n_r, p = mcnemar(s.correct, r.correct)
        comparisons.append(Comparison(
            task=task, pooling=pooling, sae_accuracy=s.accuracy, raw_accuracy=r.accuracy,
            diff=s.accuracy - r.accuracy, diff_ci=interval(boots[s.features] - boots[r.features]),
            n_sae_only=n_s, n_raw_only=n_r, mcnemar_p=p))
    return ProbeSet(fits=fits, baseline=base, comparisons=comparisons,
                    raw_skipped=None if raw_inputs is not None else (raw_skipped or "no raw representation"),
                    n_test_clusters=len(set(groups[test].tolist())), folds=folds)


def top_latents(result: ProbeResult, d_sae: int, k: int = TOP_LATENTS, *, active: sparse.csr_matrix | None = None,
                y: np.ndarray | None = None) -> list[dict]:
    """Per class, the ``k`` most positive and most negative latent weights of an SAE probe.

    Column ``c`` is latent ``c % d_sae``, pooled by mean for ``c < d_sae`` and by max above.  With
    ``active`` (proteins x latents, non-zero where the latent is active anywhere in the protein:
    the per-protein max) and ``y``, each row also has the share of the probe's *test* proteins of
    the class (``frac_class``) and of the other classes (``frac_rest``) on which the latent is active."""
    act = None
    if active is not None and y is not None and result.test is not None:
        act = (sparse.csr_matrix(active)[result.test] > 0).tocsc()
        y_test = y[result.test]
    rows = []
    for ci, cls in enumerate(result.classes):
        w = result.coef[ci]
        order = np.argsort(w, kind="stable")
        if act is not None:
            in_cls = y_test == cls
        for sign, idx in (("positive", order[::-1][:k]), ("negative", order[:k])):
            for rank, col in enumerate(idx):
                if (sign == "positive" and w[col] <= 0) or (sign == "negative" and w[col] >= 0):
                    break
                latent = int(col % d_sae)
                row = {"class": cls, "sign": sign, "rank": rank, "latent": latent,
                       "pooling": "mean" if col < d_sae else "max", "weight": float(w[col]),
                       "frac_class": None, "frac_rest": None}
                if act is not None:
                    on = act[:, latent].toarray().ravel()
                    row["frac_class"] = float(on[in_cls].mean()) if in_cls.any() else None
                    row["frac_rest"] = float(on[~in_cls].mean()) if (~in_cls).any() else None
                rows.append(row)
    return rows
