"""The (label, latent) counter of the aggregate state against a brute-force count, and the
state arrays' own mappings."""

from collections import Counter

import mmap

import numpy as np
import pytest

from plmscope.atlas._state import MAPPED_MIN_BYTES, LabelCounter, SlotPool, state_empty, state_insert, state_take

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


def test_frequent_compactions_and_latent_blocks_match_brute_force(monkeypatch):
    c = LabelCounter(L)
    monkeypatch.setattr(c, "SEGMENT_LABELS", 8)
    monkeypatch.setattr(c, "PENDING_KEYS", 100)  # compacts after nearly every batch
    truth = _feed(c, _stream(2, 300, 40))
    assert _as_counter(c) == truth
    full = c.table()
    blocks = [c.table(a, a + 7) for a in range(0, L, 7)]  # 7 does not divide 50: a short last block
    for b in blocks:
        assert len(b[0]) == 0 or (b[0].min() >= 0 and b[0].max() < L)
    got = Counter()
    for lat, codes, cnt in blocks:
        got.update({(int(la), int(k)): int(n) for la, k, n in zip(lat, codes, cnt)})
    assert got == Counter({(int(la), int(k)): int(n) for la, k, n in zip(*full)})
    assert sum(len(b[0]) for b in blocks) == len(full[0])


def _is_mapped(a: np.ndarray) -> bool:
    while isinstance(a, np.ndarray):
        a = a.base
    return isinstance(getattr(a, "obj", a), mmap.mmap)


@pytest.mark.parametrize("pos", [[0, 0, 3, 3, 3, 5], [], [5, 5], [0]])
def test_state_insert_equals_np_insert(pos):
    rng = np.random.default_rng(3)
    a = rng.integers(0, 100, 5)
    values = rng.integers(100, 200, len(pos))
    assert np.array_equal(state_insert(a, np.array(pos, dtype=np.int64), values), np.insert(a, pos, values))


def test_large_state_arrays_live_in_their_own_mappings():
    n_big = MAPPED_MIN_BYTES // 8 + 1
    big, small = state_empty(n_big, np.int64), state_empty(16, np.int64)
    assert _is_mapped(big) and big.flags.writeable and not _is_mapped(small)
    big[:] = np.arange(n_big)
    taken = state_take(big, np.arange(n_big)[::-1].copy())
    assert _is_mapped(taken) and np.array_equal(taken, np.arange(n_big)[::-1])
    # a pool's growing vector columns, and their round trip through the saved arrays
    pool = SlotPool()
    n = MAPPED_MIN_BYTES // 4 + 1  # int32 positions, float32 values
    pool.add(np.array(["P1"], dtype=object), np.array([1], np.uint64), np.array([2.0], np.float32),
             np.array([1]), np.array([n]), np.array([n]), np.array([0]), np.array([n]),
             np.arange(n, dtype=np.int32), np.ones(n, np.float32))
    assert _is_mapped(pool.vec_pos) and _is_mapped(pool.vec_val)
    back = SlotPool.from_arrays(pool.to_arrays("p_"), "p_")
    assert _is_mapped(back.vec_val) and np.array_equal(back.dense(0), pool.dense(0))
