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

Fusing: with `fusible` and `execute_batch`, when the next runnable operation has a fusion key
(`fusible(op)` is not None), the head of every other stream that is runnable too and has the same
key joins it, and `execute_batch` runs them together (one result or exception per op). Each stream
contributes at most its own next operation, so every stream's order holds. Operations that queue up
while a batch runs form the next one. With `fuse_wait_s` > 0, a fusible operation that would run
alone while other streams ran an operation of the same key in the last `_PEER_ACTIVE_S` seconds
(peers, likely to send their next one any moment) is held back up to `fuse_wait_s` from its arrival
so they can join; other runnable operations run meanwhile.

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
_PEER_ACTIVE_S = 10.0
"""A stream that ran a fusible operation this recently counts as a peer worth waiting for."""


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
    fused_key: Any = None
    """The fusion key of the last fusible operation this stream ran, and when (`time.monotonic()`)."""
    fused_at: float = float("-inf")


class ModelWorker:
    """One thread that executes the operations of many streams, each stream's in `seq_id` order."""

    def __init__(
        self,
        name: str,
        execute: Callable[[Any], Any],
        *,
        gap_timeout_s: float = 1.0,
        housekeeping: Callable[[], None] | None = None,
        fusible: Callable[[Any], Any] | None = None,
        execute_batch: Callable[[list[Any]], list[Any]] | None = None,
        max_fused: int = 64,
        fuse_wait_s: float = 0.0,
    ) -> None:
        """`fusible(op)`: a hashable fusion key or None (runs alone); called on this worker's thread
        with the queue locked, so it must be quick and must not block. `execute_batch(ops)` returns
        one result or exception instance per op, in order; it is called with 2 to `max_fused` ops."""
        if (fusible is None) != (execute_batch is None):
            raise ValueError("fusible and execute_batch go together")
        self.name = name
        self._fusible = fusible
        self._execute_batch = execute_batch
        self.max_fused = max_fused
        self.fuse_wait_s = fuse_wait_s
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

    def _ready(self, now: float) -> tuple[list[_Pending], float]:
        """The next runnable operations and how long to sleep when there are none.

        The oldest runnable head (by arrival) first; if it has a fusion key, the runnable heads of
        other streams with the same key join it (oldest first, up to `max_fused`).
        """
        runnable: list[tuple[int, str]] = []
        wait = _HOUSEKEEPING_INTERVAL_S
        for name, state in self._streams.items():
            if not state.pending:
                continue
            head = state.pending[0]
            in_order = not head.numbered or head.order <= state.next_seq_id
            overdue = now - head.arrived_at >= self.gap_timeout_s
            if in_order or overdue:
                runnable.append((head.arrival, name))
            else:
                wait = min(wait, self.gap_timeout_s - (now - head.arrived_at))
        if not runnable:
            return [], wait
        runnable.sort()
        keys = {name: self._fuse_key(self._streams[name].pending[0].op) for _, name in runnable}
        for _, name in runnable:
            key = keys[name]
            chosen = [name]
            if key is not None:
                chosen += [other for _, other in runnable if other != name and keys[other] == key][
                    : self.max_fused - 1
                ]
                held = self._hold_for_peers(name, key, now) if len(chosen) == 1 else 0.0
                if held > 0:
                    wait = min(wait, held)
                    continue
            items = []
            for chosen_name in chosen:
                state = self._streams[chosen_name]
                item = heapq.heappop(state.pending)
                if item.numbered:
                    state.next_seq_id = max(state.next_seq_id, int(item.order) + 1)
                if key is not None:
                    state.fused_key, state.fused_at = key, now
                items.append(item)
            return items, 0.0
        return [], wait

    def _hold_for_peers(self, name: str, key: Any, now: float) -> float:
        """Seconds to hold `name`'s lone fusible head back for recently active peers (0: run it now)."""
        if self.fuse_wait_s <= 0:
            return 0.0
        left = self.fuse_wait_s - (now - self._streams[name].pending[0].arrived_at)
        if left <= 0:
            return 0.0
        for other, state in self._streams.items():
            if other != name and state.fused_key == key and now - state.fused_at < _PEER_ACTIVE_S:
                return left
        return 0.0

    def _fuse_key(self, op: Any) -> Any:
        if self._fusible is None:
            return None
        try:
            return self._fusible(op)
        except Exception:  # noqa: BLE001 - an op the callback cannot judge simply runs alone
            return None

    def _loop(self) -> None:
        while True:
            with self._cond:
                items, wait = self._ready(time.monotonic())
                while not items and not self._closed:
                    self._cond.wait(timeout=wait)
                    if self._housekeeping is not None:
                        self._cond.release()
                        try:
                            self._housekeeping()
                        finally:
                            self._cond.acquire()
                    items, wait = self._ready(time.monotonic())
                if self._closed:
                    for item in items:
                        item.future.set_exception(RuntimeError(f"worker {self.name} closed"))
                    return
            items = [item for item in items if item.future.set_running_or_notify_cancel()]
            if len(items) == 1:
                self._run_one(items[0])
            elif items:
                self._run_batch(items)
            if self._housekeeping is not None:
                self._housekeeping()

    def _run_one(self, item: _Pending) -> None:
        try:
            result = self._execute(item.op)
        except BaseException as exc:  # noqa: BLE001 - every failure belongs to the op's future
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)

    def _run_batch(self, items: list[_Pending]) -> None:
        assert self._execute_batch is not None
        try:
            results = self._execute_batch([item.op for item in items])
            if len(results) != len(items):
                raise RuntimeError(f"execute_batch returned {len(results)} results for {len(items)} ops")
        except BaseException as exc:  # noqa: BLE001 - the batch failed: so did each of its ops
            results = [exc] * len(items)
        for item, result in zip(items, results, strict=True):
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
