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


# ---- fusing ------------------------------------------------------------------------------------


class _Op:
    """A fake op: `key` is its fusion key (None: runs alone); `fail` makes its batch entry an error."""

    def __init__(self, name, key="k", fail=False):
        self.name, self.key, self.fail = name, key, fail

    def __call__(self):
        return self.name


@pytest.fixture
def fusing():
    batches: list = []

    def execute_batch(ops):
        batches.append([op.name for op in ops])
        return [ValueError(op.name) if op.fail else op.name for op in ops]

    def execute(op):
        if callable(op) and not isinstance(op, _Op):
            return op()
        batches.append([op.name])
        return op.name

    w = ModelWorker(
        "fuse",
        execute,
        gap_timeout_s=0.3,
        fusible=lambda op: getattr(op, "key", None),
        execute_batch=execute_batch,
    )
    yield w, batches
    w.close()


def test_ready_heads_of_many_streams_run_as_one_batch_in_each_streams_order(fusing):
    w, batches = fusing
    gate = threading.Event()
    w.submit("gate", None, lambda: gate.wait(5))
    futures = []
    for seq in (2, 1):  # out of order: 1 and 2 of one stream never share a batch, 1 runs first
        for stream in ("a", "b", "c"):
            futures.append(w.submit(stream, seq, _Op(f"{stream}{seq}")))
    gate.set()
    assert sorted(f.result(5) for f in futures) == ["a1", "a2", "b1", "b2", "c1", "c2"]
    assert [sorted(b) for b in batches] == [["a1", "b1", "c1"], ["a2", "b2", "c2"]]


def test_only_ops_with_the_same_key_fuse_and_others_run_alone(fusing):
    w, batches = fusing
    gate = threading.Event()
    w.submit("gate", None, lambda: gate.wait(5))
    done = [
        w.submit("a", 1, _Op("a1")),
        w.submit("b", 1, _Op("b1", key=None)),
        w.submit("c", 1, _Op("c1", key="other")),
        w.submit("d", 1, _Op("d1")),
    ]
    gate.set()
    for f in done:
        f.result(5)
    assert batches == [["a1", "d1"], ["b1"], ["c1"]]


def test_a_failing_op_in_a_batch_fails_only_its_future(fusing):
    w, _ = fusing
    gate = threading.Event()
    w.submit("gate", None, lambda: gate.wait(5))
    good = w.submit("a", 1, _Op("a1"))
    bad = w.submit("b", 1, _Op("b1", fail=True))
    gate.set()
    assert good.result(5) == "a1"
    with pytest.raises(ValueError, match="b1"):
        bad.result(5)


def test_a_batch_that_raises_fails_each_of_its_ops():
    def execute_batch(ops):
        raise RuntimeError("pass failed")

    w = ModelWorker(
        "fuse", lambda op: op(), fusible=lambda op: getattr(op, "key", None), execute_batch=execute_batch
    )
    try:
        gate = threading.Event()
        w.submit("gate", None, lambda: gate.wait(5))
        futures = [w.submit(s, 1, _Op(s)) for s in ("a", "b")]
        gate.set()
        for f in futures:
            with pytest.raises(RuntimeError, match="pass failed"):
                f.result(5)
        assert w.submit("a", 2, lambda: "next").result(5) == "next"
    finally:
        w.close()


def test_a_lone_fusible_op_waits_briefly_for_active_peers():
    batches: list = []
    w = ModelWorker(
        "fuse",
        lambda op: (batches.append([op.name]), op.name)[1],
        fusible=lambda op: op.key,
        execute_batch=lambda ops: (batches.append([op.name for op in ops]), [op.name for op in ops])[1],
        fuse_wait_s=2.0,
    )
    try:
        w.submit("a", 1, _Op("a1"))
        w.submit("b", 1, _Op("b1")).result(5)  # a and b ran fusible ops: they are peers now (1 or 2 batches)
        batches.clear()
        first = w.submit("a", 2, _Op("a2"))
        time.sleep(0.2)
        assert not first.done()  # held for b
        second = w.submit("b", 2, _Op("b2"))
        assert (first.result(5), second.result(5)) == ("a2", "b2")
        assert [sorted(b) for b in batches] == [["a2", "b2"]]
        alone = w.submit("c", 1, _Op("c1", key="other"))  # no peer ran key "other": no wait
        assert alone.result(1) == "c1"
    finally:
        w.close()
