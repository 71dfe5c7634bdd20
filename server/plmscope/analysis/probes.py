"""Linear probes for protein-level labels: SAE latents vs the raw pLM representation.

Task ``location``: the corpus's subcellular location classes.  Proteins with exactly one class
are used as a single-label multiclass problem (multi-location proteins are left out rather than
turned into one-vs-rest tasks, so accuracy is comparable with InterProt's single-label probe);
classes with fewer than ``MIN_CLASS_PROTEINS`` such proteins are dropped.

Features, on the same train/test split:

* ``sae_mean_max``: per latent, mean pooling (sum of activations / protein length) and max
  pooling, from ``protein_latent_stats`` (2 x d_sae columns, sparse);
* ``raw_mean``: the mean raw pLM representation of the same layer (``protein_embeddings``).

Each is standardised and fitted with sklearn's multinomial ``LogisticRegression`` (L2, ``C``
fixed at ``PROBE_C``, seeded).  The split is sklearn's ``StratifiedGroupKFold`` (first fold is the
test set): classes keep their proportions and identical sequences share a group, so a duplicate
cannot be in train and test.  Weights are on standardised features, so their sizes compare.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..errors import PlmscopeError

MIN_CLASS_PROTEINS = 10
TEST_FOLDS = 5  # 1 of 5 folds -> 20 % test
PROBE_C = 1.0
MAX_ITER = 2000
TOP_LATENTS = 10  # per class and sign


class ProbeSkipped(PlmscopeError):
    """The atlas lacks what a probe needs; the message is the stated reason."""


@dataclass
class ProbeResult:
    task: str
    features: str
    accuracy: float
    macro_f1: float
    n_train: int
    n_test: int
    classes: list[str]
    coef: np.ndarray  # (n_classes, n_features) on standardised features


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


def split(y: np.ndarray, groups: Sequence[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train / test indices: stratified by class, grouped (analyze passes MMseqs2 clusters)."""
    n_splits = int(min(TEST_FOLDS, np.unique(y, return_counts=True)[1].min()))
    if n_splits < 2:
        raise ProbeSkipped("a class has fewer than 2 proteins; cannot hold out a test set")
    gid = [hashlib.sha256(g.encode()).hexdigest() for g in groups]
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train, test = next(cv.split(np.zeros(len(y)), y, gid))
    return train, test


def fit_probe(X, y: np.ndarray, train: np.ndarray, test: np.ndarray, *, task: str, features: str, seed: int = 0) -> ProbeResult:
    # Sparse SAE features are scaled without centring (keeps them sparse; LR fits the intercept).
    scaler = StandardScaler(with_mean=not sparse.issparse(X))
    model = make_pipeline(scaler, LogisticRegression(C=PROBE_C, max_iter=MAX_ITER, random_state=seed))
    model.fit(X[train], y[train])
    pred = model.predict(X[test])
    lr = model[-1]
    classes = [str(c) for c in lr.classes_]
    coef = lr.coef_ if len(classes) > 2 else np.vstack([-lr.coef_[0], lr.coef_[0]])
    return ProbeResult(
        task=task,
        features=features,
        accuracy=float(accuracy_score(y[test], pred)),
        macro_f1=float(f1_score(y[test], pred, average="macro")),
        n_train=len(train),
        n_test=len(test),
        classes=classes,
        coef=coef,
    )


def sae_features(max_act: sparse.csr_matrix, sum_act: sparse.csr_matrix, lengths: np.ndarray) -> sparse.csr_matrix:
    """[mean pooling | max pooling] columns (latent j -> columns j and d_sae + j)."""
    mean = sparse.diags(1.0 / np.maximum(np.asarray(lengths, np.float64), 1)) @ sum_act
    return sparse.hstack([mean, max_act], format="csr")


def top_latents(result: ProbeResult, d_sae: int, k: int = TOP_LATENTS) -> list[dict]:
    """Per class, the ``k`` most positive and most negative latent features of an SAE probe."""
    rows = []
    for ci, cls in enumerate(result.classes):
        w = result.coef[ci]
        order = np.argsort(w)
        for sign, idx in (("positive", order[::-1][:k]), ("negative", order[:k])):
            for rank, col in enumerate(idx):
                if (sign == "positive" and w[col] <= 0) or (sign == "negative" and w[col] >= 0):
                    break
                rows.append({
                    "class": cls, "sign": sign, "rank": rank, "latent": int(col % d_sae),
                    "pooling": "mean" if col < d_sae else "max", "weight": float(w[col]),
                })
    return rows
