"""The (label, latent) counter of the aggregate state against a brute-force count, the state
arrays' own mappings and the reusable pending columns."""

from collections import Counter

import mmap

import numpy as np
import pytest

from plmscope.atlas._state import MAPPED_MIN_BYTES, Columns, LabelCounter, SlotPool, state_empty, state_take

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
    codes, lat, cnt = c.table()
    return Counter({(c.labels[k], int(la)): int(n) for k, la, n in zip(codes, lat, cnt)})


def _drained(parts) -> Counter:
    """Sum of drained parts, through each part's own labels (as the write phase sums them)."""
    out = Counter()
    for d in parts:
        out.update({(str(d["labels"][k]), int(la)): int(n) for k, la, n in zip(d["code"], d["latent"], d["n"])})
    return out


def test_counts_match_brute_force_with_frequent_compactions(monkeypatch):
    c = LabelCounter(L)
    monkeypatch.setattr(c, "PENDING_KEYS", 100)  # compacts after nearly every batch
    truth = _feed(c, _stream(0, 300, 60))
    assert _as_counter(c) == truth
    codes, lat, cnt = c.table()
    keys = codes * L + lat
    assert np.all(np.diff(keys) > 0) and (cnt > 0).all()  # sorted, unique, no empty pairs
    assert c.nbytes >= 16 * len(keys)


def test_drained_parts_sum_to_one_counter_and_start_afresh():
    """Draining after every few batches (as every spill part does) loses and doubles nothing,
    and each part names its own labels (codes restart at 0)."""
    batches = list(_stream(1, 200, 40))
    one, c = LabelCounter(L), LabelCounter(L)
    truth = _feed(one, batches)
    parts = []
    for i in range(0, len(batches), 7):
        _feed(c, batches[i : i + 7])
        parts.append(c.drain())
        assert c.labels == [] and c.nbytes == 0 and len(c.table()[2]) == 0
    assert _drained(parts) == _as_counter(one) == truth
    assert all(d["code"].dtype == np.int32 and d["latent"].dtype == np.int32 for d in parts)
    assert all(len(d["code"]) == 0 or d["code"].max() < len(d["labels"]) for d in parts)
    empty = LabelCounter(L).drain()
    assert len(empty["labels"]) == len(empty["n"]) == 0


def test_merge_and_round_trip_equal_one_counter():
    one, a, b = LabelCounter(L), LabelCounter(L), LabelCounter(L)
    batches = list(_stream(2, 200, 40))
    truth = _feed(one, batches)
    _feed(a, batches[::2])
    _feed(b, batches[1::2])  # b codes labels in another order than a
    a.merge(LabelCounter.from_arrays(b.to_arrays("x_"), "x_", L))
    assert _as_counter(a) == _as_counter(one) == truth
    empty = LabelCounter.from_arrays(LabelCounter(L).to_arrays("e_"), "e_", L)
    assert _as_counter(empty) == Counter()


def _is_mapped(a: np.ndarray) -> bool:
    while isinstance(a, np.ndarray):
        a = a.base
    return isinstance(getattr(a, "obj", a), mmap.mmap)


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


def test_columns_append_refill_and_keep_their_mapped_buffers():
    rng = np.random.default_rng(3)
    cols, reused = Columns(), 0
    for part in range(3):  # three spill parts through the same columns
        size = 5000 if part == 0 else 3000
        ints = [rng.integers(0, 100, int(rng.integers(0, size))).astype(np.int32) for _ in range(7)]
        rows = [rng.random((int(rng.integers(1, 40)), 5), dtype=np.float32) for _ in range(7)]
        for a, r in zip(ints, rows):
            cols.append("n", a)
            cols.append("emb", r)
        got = cols.arrays()
        assert np.array_equal(got["n"], np.concatenate(ints)) and got["n"].dtype == np.int32
        assert np.array_equal(got["emb"], np.concatenate(rows)) and got["emb"].shape[1] == 5
        assert cols.nbytes == sum(a.nbytes for a in ints) + sum(r.nbytes for r in rows)
        assert _is_mapped(got["n"]) and _is_mapped(got["emb"])
        if part and len(got["n"]) <= len(buffer):  # refilled within the capacity: the same buffer
            assert np.shares_memory(got["n"], buffer)
            reused += 1
        buffer = cols._buf["n"]
        cols.clear()
        assert len(cols) == 0 and cols.nbytes == 0 and len(cols.arrays()["n"]) == 0
    assert reused == 2
    with pytest.raises(TypeError, match="'n' holds int32"):
        cols.append("n", np.zeros(3, np.int64))
