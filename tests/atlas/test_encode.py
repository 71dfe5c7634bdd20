"""The build's pipeline: the SAE side of batch i runs on one worker thread beside the forward of
batch i+1; calls stay in order, at most ``in_flight`` are unfinished, and a worker's error
reaches the build's thread; and how a batch is handed to the worker and cut into pieces.  (That a pipelined build writes the serial build's atlas is
``tests/atlas/test_build.py::test_spill_parts_build_the_same_atlas``.)"""

import threading
import time

import numpy as np
import pytest
import torch

from plmscope.atlas.encode import Pipeline, SAEStage, _pieces


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[int] = []
        self.threads: set[int] = set()
        self.running = 0
        self.max_running = 0
        self.lock = threading.Lock()

    def __call__(self, i: int, delay: float = 0.0) -> None:
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        time.sleep(delay)
        self.calls.append(i)
        self.threads.add(threading.get_ident())
        with self.lock:
            self.running -= 1


@pytest.mark.parametrize("in_flight", [1, 2])
def test_calls_run_in_order_on_one_worker_with_bounded_backlog(in_flight):
    rec = _Recorder()
    with Pipeline(in_flight) as pipe:
        for i in range(12):
            pipe.submit(rec, i, 0.002 * (i % 3))  # uneven durations: order must not follow them
            assert len(pipe._running) <= in_flight
        pipe.wait()
        assert rec.calls == list(range(12))
        for i in range(12, 15):  # usable again after a wait; leaving the block waits too
            pipe.submit(rec, i)
    assert rec.calls == list(range(15))
    assert rec.threads and threading.get_ident() not in rec.threads and len(rec.threads) == 1
    assert rec.max_running == 1


def test_serial_mode_runs_in_the_callers_thread():
    rec = _Recorder()
    with Pipeline(0) as pipe:
        for i in range(3):
            pipe.submit(rec, i)
            assert rec.calls == list(range(i + 1))  # already done when submit returns
    assert rec.threads == {threading.get_ident()}


def test_worker_error_surfaces_in_the_callers_thread_and_stops_later_calls():
    rec = _Recorder()

    def fail(i):
        raise ValueError(f"batch {i} is bad")

    with pytest.raises(ValueError, match="batch 1 is bad"):
        with Pipeline(1) as pipe:
            pipe.submit(rec, 0)
            pipe.submit(fail, 1)
            pipe.submit(rec, 2)  # waits for the failed call: raises its error here
            pipe.submit(rec, 3)
    assert rec.calls == [0]  # the submit after the failed call raised: nothing more ran
    with pytest.raises(ValueError, match="batch 3 is bad"):
        with Pipeline(1) as pipe:
            pipe.submit(fail, 3)
            pipe.wait()


def test_leaving_on_an_error_cancels_what_has_not_started():
    rec = _Recorder()
    with pytest.raises(KeyboardInterrupt):
        with Pipeline(2) as pipe:
            pipe.submit(rec, 0, 0.05)
            pipe.submit(rec, 1, 0.0)
            raise KeyboardInterrupt  # e.g. Ctrl-C in the forward pass
    assert rec.calls == [0]  # the running call finished; the queued one never ran


def test_pieces_cover_the_proteins_in_order_within_the_row_budget():
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 3000, int(rng.integers(1, 40)))
        ends = np.cumsum(lengths)
        pieces = _pieces(ends, 2048)
        assert pieces[0][0] == 0 and pieces[-1][1] == len(lengths)
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))  # contiguous, in order
        for p0, p1 in pieces:
            assert p1 > p0
            rows = int(lengths[p0:p1].sum())
            assert rows <= 2048 or p1 - p0 == 1  # only a single long protein exceeds the budget
            if p1 < len(lengths):  # and a piece is not cut short while the next protein still fits
                assert rows + int(lengths[p1]) > 2048


def test_pack_copies_into_reused_slots_and_frees_nothing_it_still_needs(tmp_path):
    stage = SAEStage([], [], [], [], tmp_path, torch.device("cpu"), slots=2)
    g = torch.Generator().manual_seed(0)

    def batch(lengths):
        return [(f"P{i}", "A" * (n + 3), torch.randn(n, 8, generator=g)) for i, n in enumerate(lengths)]

    b1, b2, b3 = batch([5, 7]), batch([4, 4, 4]), batch([3])
    p1, p2 = stage.pack(b1), stage.pack(b2)
    accs, seqs, lengths, X = p1
    assert accs == ["P0", "P1"] and seqs == ["A" * 5, "A" * 7] and lengths == [5, 7]  # what the pLM saw
    assert torch.equal(X, torch.cat([r for *_, r in b1]))
    assert torch.equal(p2[3], torch.cat([r for *_, r in b2]))  # two slots: the first is intact
    assert not np.shares_memory(p1[3].numpy(), p2[3].numpy())
    p3 = stage.pack(b3)  # the third batch takes the first slot again (no new buffer)
    assert np.shares_memory(p3[3].numpy(), p1[3].numpy()) and torch.equal(p3[3], b3[0][2])
    big = stage.pack(batch([40, 50]))  # larger than its slot: a new, larger buffer
    assert big[3].shape == (90, 8) and torch.equal(p3[3], b3[0][2])
