"""The ordered operation queue: runs each model's operations in the order its client numbered them.

A `ModelWorker` owns one thread (one device's worth of training) and an `execute` function that
runs one operation. Many models (LoRA adapters on one base) share it; per model ("stream"),
operations run in `seq_id` order. The Tinker SDK sends a model's requests in order, except the
chunks of one `forward_backward`, which go out together with the lowest id last. So an operation
whose predecessor has not arrived waits briefly (`gap_timeout_s`) and then runs anyway: chunks of
one call commute (gradients add up), and a client that reserved an id it never sent (a failed
custom loss) must not stall its model forever.

An operation without a `seq_id` (create, free, release) runs after every operation of its stream
already queued, so freeing a model never overtakes the work queued before it.
(tests/server/test_worker.py::test_unnumbered_op_runs_after_queued_ones guards this.)

The step loop: take the next runnable operation, execute it, publish its result; between
operations, `housekeeping` runs (the trainer frees expired custom-loss graphs there).

This module knows nothing about HTTP, tensors, checkpoints, or what an operation is: `execute`
does. Repeated submissions are the server's concern (`tether.server.dedupe`).
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_HOUSEKEEPING_INTERVAL_S = 1.0


@dataclass(order=True)
class _Pending:
    order: float
    """`seq_id`, or for an unnumbered op the highest order queued in its stream when it arrived."""
    arrival: int
    arrived_at: float = field(compare=False)
    numbered: bool = field(compare=False)
    op: Any = field(compare=False)
    future: concurrent.futures.Future = field(compare=False)


@dataclass
class _Stream:
    next_seq_id: int = 1
    """Tinker clients number a model's operations 1, 2, 3, ... (a create-via-load is seq 0)."""
    pending: list[_Pending] = field(default_factory=list)


class ModelWorker:
    """One thread that executes the operations of many streams, each stream's in `seq_id` order."""

    def __init__(
        self,
        name: str,
        execute: Callable[[Any], Any],
        *,
        gap_timeout_s: float = 1.0,
        housekeeping: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.gap_timeout_s = gap_timeout_s
        self._execute = execute
        self._housekeeping = housekeeping
        self._cond = threading.Condition()
        self._streams: dict[str, _Stream] = {}
        self._arrivals = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"tether-worker-{name}", daemon=True)
        self._thread.start()

    def submit(self, stream: str, seq_id: int | None, op: Any) -> concurrent.futures.Future:
        """Queue `op` in `stream`; it is queued when this returns. The future holds `execute(op)`'s result."""
        with self._cond:
            if self._closed:
                raise RuntimeError(f"worker {self.name} is closed")
            future: concurrent.futures.Future = concurrent.futures.Future()
            state = self._streams.setdefault(stream, _Stream())
            if seq_id is None:
                order = max((p.order for p in state.pending), default=float(state.next_seq_id - 1))
            else:
                order = float(seq_id)
            item = _Pending(order, next(self._arrivals), time.monotonic(), seq_id is not None, op, future)
            heapq.heappush(state.pending, item)
            self._cond.notify_all()
            return future

    def forget(self, stream: str) -> None:
        """Drop a stream's ordering state once it has nothing queued (its model was deleted)."""
        with self._cond:
            state = self._streams.get(stream)
            if state is not None and not state.pending:
                del self._streams[stream]

    def queued(self) -> int:
        """Operations waiting to run (for load reporting)."""
        with self._cond:
            return sum(len(s.pending) for s in self._streams.values())

    def close(self) -> None:
        """Stop after the running operation; queued ones fail with `RuntimeError`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        with self._cond:
            for state in self._streams.values():
                for item in state.pending:
                    item.future.set_exception(RuntimeError(f"worker {self.name} closed"))
                state.pending.clear()

    def _ready(self, now: float) -> tuple[_Pending | None, float]:
        """The next runnable operation (oldest arrival first among streams) and how long to sleep otherwise."""
        best: tuple[int, str] | None = None
        wait = _HOUSEKEEPING_INTERVAL_S
        for name, state in self._streams.items():
            if not state.pending:
                continue
            head = state.pending[0]
            in_order = not head.numbered or head.order <= state.next_seq_id
            overdue = now - head.arrived_at >= self.gap_timeout_s
            if in_order or overdue:
                if best is None or head.arrival < best[0]:
                    best = (head.arrival, name)
            else:
                wait = min(wait, self.gap_timeout_s - (now - head.arrived_at))
        if best is None:
            return None, wait
        state = self._streams[best[1]]
        item = heapq.heappop(state.pending)
        if item.numbered:
            state.next_seq_id = max(state.next_seq_id, int(item.order) + 1)
        return item, 0.0

    def _loop(self) -> None:
        while True:
            with self._cond:
                item, wait = self._ready(time.monotonic())
                while item is None and not self._closed:
                    self._cond.wait(timeout=wait)
                    if self._housekeeping is not None:
                        self._cond.release()
                        try:
                            self._housekeeping()
                        finally:
                            self._cond.acquire()
                    item, wait = self._ready(time.monotonic())
                if self._closed:
                    if item is not None:
                        item.future.set_exception(RuntimeError(f"worker {self.name} closed"))
                    return
            assert item is not None  # the wait above ends with an item or with the worker closed
            if not item.future.set_running_or_notify_cancel():
                continue
            try:
                result = self._execute(item.op)
            except BaseException as exc:  # noqa: BLE001 - every failure belongs to the op's future
                item.future.set_exception(exc)
            else:
                item.future.set_result(result)
            if self._housekeeping is not None:
                self._housekeeping()
