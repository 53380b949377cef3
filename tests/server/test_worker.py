"""The ordered operation queue, with fake operations (callables; no model)."""

from __future__ import annotations

import threading
import time

import pytest

from tether.engine.worker import ModelWorker


@pytest.fixture
def worker():
    w = ModelWorker("test", lambda op: op(), gap_timeout_s=0.3)
    yield w
    w.close()


def _recorder(log: list, name: object, delay: float = 0.0):
    def run():
        time.sleep(delay)
        log.append(name)
        return name

    return run


def test_runs_in_seq_order_even_when_submitted_out_of_order(worker):
    log: list = []
    gate = threading.Event()
    worker.submit("m", None, lambda: gate.wait(5))
    for seq in (3, 2, 4, 1):
        worker.submit("m", seq, _recorder(log, seq))
    gate.set()
    worker.submit("m", 5, _recorder(log, 5)).result(5)
    assert log == [1, 2, 3, 4, 5]


def test_missing_seq_id_does_not_stall_forever(worker):
    log: list = []
    worker.submit("m", 1, _recorder(log, 1)).result(5)
    start = time.monotonic()
    assert worker.submit("m", 3, _recorder(log, 3)).result(5) == 3
    assert time.monotonic() - start >= 0.25
    assert log == [1, 3]


def test_unnumbered_op_runs_after_queued_ones(worker):
    """Freeing a model (no seq_id) never overtakes the work queued before it."""
    log: list = []
    gate = threading.Event()
    worker.submit("m", 1, lambda: gate.wait(5))
    for seq in (3, 2):
        worker.submit("m", seq, _recorder(log, seq))
    free = worker.submit("m", None, _recorder(log, "free"))
    worker.submit("m", 4, _recorder(log, 4))
    gate.set()
    free.result(5)
    time.sleep(0.05)
    assert log == [2, 3, "free", 4]


def test_unnumbered_op_waits_for_a_gap_before_it(worker):
    log: list = []
    worker.submit("m", 1, _recorder(log, 1)).result(5)
    worker.submit("m", 3, _recorder(log, 3))  # 2 never comes: 3 runs after the gap timeout
    worker.submit("m", None, _recorder(log, "free")).result(5)
    assert log == [1, 3, "free"]


def test_models_do_not_share_ordering(worker):
    log: list = []
    worker.submit("a", 1, _recorder(log, "a1"))
    worker.submit("b", 1, _recorder(log, "b1"))
    worker.submit("b", 2, _recorder(log, "b2")).result(5)
    assert sorted(log) == ["a1", "b1", "b2"]


def test_failing_op_fails_only_its_future(worker):
    def boom():
        raise ValueError("bad")

    failed = worker.submit("m", 1, boom)
    ok = worker.submit("m", 2, lambda: 42)
    with pytest.raises(ValueError):
        failed.result(5)
    assert ok.result(5) == 42


def test_housekeeping_runs_between_ops_and_when_idle():
    calls: list = []
    w = ModelWorker("hk", lambda op: op(), housekeeping=lambda: calls.append(time.monotonic()))
    try:
        w.submit("m", 1, lambda: None).result(5)
        assert calls  # after the op
        before = len(calls)
        time.sleep(1.3)  # idle: the loop still wakes up for housekeeping about once a second
        assert len(calls) > before
    finally:
        w.close()
