"""The (label, latent) counter of the aggregate state against a brute-force count."""

from collections import Counter

import numpy as np

from plmscope.atlas._state import LabelCounter

L = 50


def _stream(seed: int, n_labels: int, n_batches: int):
    rng = np.random.default_rng(seed)
    for _ in range(n_batches):
        n = int(rng.integers(0, 4000))
        # skewed labels, so that some pairs repeat across batches and others are new
        yield [f"PF{int(x):05d}" for x in rng.zipf(1.3, n) % n_labels], rng.integers(0, L, n)


def _feed(counter: LabelCounter, batches) -> Counter:
    truth = Counter()
    for labels, lat in batches:
        counter.add(np.array([counter.code(x) for x in labels], dtype=np.int64), lat)
        truth.update(zip(labels, lat.tolist()))
    return truth


def _as_counter(c: LabelCounter) -> Counter:
    lat, codes, cnt = c.table()
    return Counter({(c.labels[k], int(la)): int(n) for la, k, n in zip(lat, codes, cnt)})


def test_counts_match_brute_force_across_segments(monkeypatch):
    c = LabelCounter(L)
    monkeypatch.setattr(c, "SEGMENT_LABELS", 8)  # 300 labels -> ~38 segments
    truth = _feed(c, _stream(0, 300, 60))
    assert _as_counter(c) == truth
    assert len(c.seg_keys) > 8 and sum(len(k) for k in c.seg_keys) == len(truth)
    keys = c.keys
    assert np.all(np.diff(keys) > 0)  # one sorted, unique key set across the segments


def test_merge_and_round_trip_equal_one_counter(monkeypatch):
    monkeypatch.setattr(LabelCounter, "SEGMENT_LABELS", 8)
    one, a, b = LabelCounter(L), LabelCounter(L), LabelCounter(L)
    batches = list(_stream(1, 200, 40))
    truth = _feed(one, batches)
    _feed(a, batches[::2])
    _feed(b, batches[1::2])  # b codes labels in another order than a
    a.merge(LabelCounter.from_arrays(b.to_arrays("x_"), "x_", L))
    assert _as_counter(a) == _as_counter(one) == truth
    empty = LabelCounter.from_arrays(LabelCounter(L).to_arrays("e_"), "e_", L)
    assert len(empty.keys) == 0 and _as_counter(empty) == Counter()
