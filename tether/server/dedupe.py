"""Idempotent submission: a repeat of `(stream, seq_id)` is answered by the first submission's request id.

Streams are a model's operations (`model_id`) and a sampling session's samples
(`sampling_session_id`). Each stream keeps a window of its most recent claims, so memory stays flat
over a run of any length (tests/server/test_dedupe.py::test_memory_is_flat_over_a_long_run). A
retry older than the window is refused with `ConflictError` rather than executed twice: the Tinker
SDK retries within seconds, far inside any window.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from tether.types.errors import ConflictError

DEFAULT_WINDOW = 4096
"""Claims remembered per stream."""


@dataclass
class _Window:
    claims: OrderedDict[int, str] = field(default_factory=OrderedDict)
    max_forgotten: int | None = None
    """The highest seq_id pushed out of the window; a repeat at or below it cannot be recognised."""


class DedupeRegistry:
    """Remembers which request answered each `(stream, seq_id)`, per stream within a window; thread-safe."""

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self._lock = threading.Lock()
        self._streams: dict[str, _Window] = {}

    def claim(self, stream: str, seq_id: int, request_id: str) -> str | None:
        """Record `request_id` for `(stream, seq_id)`; return the earlier request id if there was one.

        Raises `ConflictError` for a seq_id at or below one that has left the window.
        """
        with self._lock:
            window = self._streams.setdefault(stream, _Window())
            earlier = window.claims.get(seq_id)
            if earlier is not None:
                return earlier
            if window.max_forgotten is not None and seq_id <= window.max_forgotten:
                raise ConflictError(
                    f"seq_id {seq_id} of {stream!r} is older than the last {self.window} requests; "
                    "it was answered already or is too late"
                )
            window.claims[seq_id] = request_id
            while len(window.claims) > self.window:
                forgotten, _ = window.claims.popitem(last=False)
                window.max_forgotten = max(forgotten, window.max_forgotten or forgotten)
            return None

    def lookup(self, stream: str, seq_id: int) -> str | None:
        """The request id that claimed `(stream, seq_id)`, if it is remembered."""
        with self._lock:
            window = self._streams.get(stream)
            return window.claims.get(seq_id) if window is not None else None

    def release(self, stream: str, seq_id: int) -> None:
        """Forget one claim (its submission was rejected before it was queued)."""
        with self._lock:
            window = self._streams.get(stream)
            if window is not None:
                window.claims.pop(seq_id, None)

    def forget_stream(self, stream: str) -> None:
        """Drop every claim of a stream (its model or sampling session is gone)."""
        with self._lock:
            self._streams.pop(stream, None)

    def size(self) -> int:
        """Claims held over all streams (for tests and load reporting)."""
        with self._lock:
            return sum(len(w.claims) for w in self._streams.values())
