"""The ordered operation queue: runs each model's operations in the order its client numbered them.

A `ModelWorker` owns one thread (one device's worth of training). Many models (LoRA adapters on one
base) share it; per model, operations run in `seq_id` order. The Tinker SDK sends a model's requests
in order, except the chunks of one `forward_backward`, which go out together with the lowest id last.
So an operation whose predecessor has not arrived waits briefly (`gap_timeout_s`) and then runs
anyway: chunks of one call commute (gradients add up), and a client that reserved an id it never
sent (a failed custom loss) must not stall its model forever.

`DedupeRegistry` makes submission idempotent: a repeat of `(stream, seq_id)` is answered with the
first submission's operation id and is never executed twice. It is shared with the sampling path,
which never goes through a `ModelWorker` (sampling must not wait behind training).

This module knows nothing about HTTP, tensors or checkpoints: an operation is a callable.
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


class DedupeRegistry:
    """Remembers which operation answered each `(stream, seq_id)`; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int], str] = {}

    def claim(self, stream: str, seq_id: int, op_id: str) -> str | None:
        """Record `op_id` for `(stream, seq_id)`; return the earlier op id if there was one."""
        with self._lock:
            earlier = self._seen.get((stream, seq_id))
            if earlier is None:
                self._seen[(stream, seq_id)] = op_id
            return earlier

    def release(self, stream: str, seq_id: int) -> None:
        """Forget one claim (its submission was rejected before it was queued)."""
        with self._lock:
            self._seen.pop((stream, seq_id), None)

    def forget_stream(self, stream: str) -> None:
        """Drop every claim of a stream (its model or sampling session is gone)."""
        with self._lock:
            for key in [k for k in self._seen if k[0] == stream]:
                del self._seen[key]


@dataclass(order=True)
class _Pending:
    seq_id: int
    arrival: int
    arrived_at: float = field(compare=False)
    op_id: str = field(compare=False)
    run: Callable[[], Any] = field(compare=False)
    future: concurrent.futures.Future = field(compare=False)


@dataclass
class _Stream:
    next_seq_id: int = 1
    """Tinker clients number a model's operations 1, 2, 3, ... (a create-via-load is seq 0)."""
    pending: list[_Pending] = field(default_factory=list)


@dataclass(frozen=True)
class Submission:
    """What `ModelWorker.submit` answers: the operation that will answer this request."""

    op_id: str
    future: concurrent.futures.Future | None
    """None for a duplicate whose first execution has already finished (its op id answers it)."""
    duplicate: bool


class ModelWorker:
    """One thread that executes the operations of many models, each model's in `seq_id` order."""

    def __init__(self, name: str, *, gap_timeout_s: float = 1.0) -> None:
        self.name = name
        self.gap_timeout_s = gap_timeout_s
        self.dedupe = DedupeRegistry()
        self._cond = threading.Condition()
        self._streams: dict[str, _Stream] = {}
        self._futures: dict[str, concurrent.futures.Future] = {}
        self._arrivals = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"tether-worker-{name}", daemon=True)
        self._thread.start()

    def submit(self, stream: str, seq_id: int | None, op_id: str, run: Callable[[], Any]) -> Submission:
        """Queue `run` as operation `op_id` of `stream`; it is queued when this returns.

        `seq_id=None` (model creation, create-via-load) runs before any numbered operation that
        arrives later. A repeated `(stream, seq_id)` returns the first submission untouched.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError(f"worker {self.name} is closed")
            if seq_id is not None:
                earlier = self.dedupe.claim(stream, seq_id, op_id)
                if earlier is not None:
                    return Submission(earlier, self._futures.get(earlier), duplicate=True)
            future: concurrent.futures.Future = concurrent.futures.Future()
            state = self._streams.setdefault(stream, _Stream())
            order = -1 if seq_id is None else seq_id
            heapq.heappush(state.pending, _Pending(order, next(self._arrivals), time.monotonic(), op_id, run, future))
            self._futures[op_id] = future
            self._cond.notify_all()
            return Submission(op_id, future, duplicate=False)

    def forget(self, stream: str) -> None:
        """Drop a stream's ordering and dedupe state (its model was deleted); queued work still runs."""
        with self._cond:
            state = self._streams.get(stream)
            if state is not None and not state.pending:
                del self._streams[stream]
        self.dedupe.forget_stream(stream)

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
        wait = 3600.0
        for name, state in self._streams.items():
            if not state.pending:
                continue
            head = state.pending[0]
            in_order = head.seq_id <= state.next_seq_id
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
        if item.seq_id >= 0:
            state.next_seq_id = max(state.next_seq_id, item.seq_id + 1)
        return item, 0.0

    def _loop(self) -> None:
        while True:
            with self._cond:
                item, wait = self._ready(time.monotonic())
                while item is None and not self._closed:
                    self._cond.wait(timeout=wait)
                    item, wait = self._ready(time.monotonic())
                if self._closed:
                    if item is not None:
                        item.future.set_exception(RuntimeError(f"worker {self.name} closed"))
                    return
            if not item.future.set_running_or_notify_cancel():
                continue
            try:
                result = item.run()
            except BaseException as exc:  # noqa: BLE001 - every failure belongs to the op's future
                item.future.set_exception(exc)
            else:
                item.future.set_result(result)
            with self._cond:  # the caller holds the future now; a later duplicate only needs the op id
                self._futures.pop(item.op_id, None)
