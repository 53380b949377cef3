"""The ordered operation queue, with fake operations (no model)."""

from __future__ import annotations

import threading
import time

import pytest

from tether.engine.worker import DedupeRegistry, ModelWorker


@pytest.fixture
def worker():
    w = ModelWorker("test", gap_timeout_s=0.3)
    yield w
    w.close()


def _recorder(log: list, name: str, delay: float = 0.0):
    def run():
        time.sleep(delay)
        log.append(name)
        return name

    return run


def test_runs_in_seq_order_even_when_submitted_out_of_order(worker):
    log: list = []
    gate = threading.Event()
    worker.submit("m", None, "create", lambda: gate.wait(5))
    for seq in (3, 2, 4, 1):
        worker.submit("m", seq, f"op{seq}", _recorder(log, seq))
    gate.set()
    worker.submit("m", 5, "op5", _recorder(log, 5)).future.result(5)
    assert log == [1, 2, 3, 4, 5]


def test_missing_seq_id_does_not_stall_forever(worker):
    log: list = []
    worker.submit("m", 1, "a", _recorder(log, 1)).future.result(5)
    start = time.monotonic()
    assert worker.submit("m", 3, "c", _recorder(log, 3)).future.result(5) == 3
    assert time.monotonic() - start >= 0.25
    assert log == [1, 3]


def test_duplicate_seq_id_is_answered_by_first_execution(worker):
    calls: list = []
    gate = threading.Event()
    worker.submit("m", None, "create", lambda: gate.wait(5))
    first = worker.submit("m", 1, "first", lambda: calls.append(1) or "result")
    again = worker.submit("m", 1, "second", lambda: calls.append(2) or "other")
    assert again.duplicate and again.op_id == "first"
    assert again.future is first.future
    gate.set()
    assert first.future.result(5) == "result"
    time.sleep(0.05)
    late = worker.submit("m", 1, "third", lambda: calls.append(3) or "late")
    assert late.duplicate and late.op_id == "first" and late.future is None
    assert calls == [1]


def test_models_do_not_share_ordering(worker):
    log: list = []
    worker.submit("a", 1, "a1", _recorder(log, "a1"))
    worker.submit("b", 1, "b1", _recorder(log, "b1"))
    worker.submit("b", 2, "b2", _recorder(log, "b2")).future.result(5)
    assert sorted(log) == ["a1", "b1", "b2"]


def test_failing_op_fails_only_its_future(worker):
    def boom():
        raise ValueError("bad")

    failed = worker.submit("m", 1, "x", boom)
    ok = worker.submit("m", 2, "y", lambda: 42)
    with pytest.raises(ValueError):
        failed.future.result(5)
    assert ok.future.result(5) == 42


def test_dedupe_registry_release_and_forget():
    reg = DedupeRegistry()
    assert reg.claim("s", 0, "r0") is None
    assert reg.claim("s", 0, "r1") == "r0"
    reg.release("s", 0)
    assert reg.claim("s", 0, "r2") is None
    reg.forget_stream("s")
    assert reg.claim("s", 0, "r3") is None
