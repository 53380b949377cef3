"""Futures of queued operations, fetched by long-polling `retrieve_future`.

Submitting an operation answers `{"request_id"}` at once; the client then polls. A poll is held until
the result exists or `long_poll_s` passes (then `try_again`), so a waiting client costs one request
per ~25 s, not a hot loop. Results stay until fetched and a while after (a client re-fetches after a
network error); the operation's result is already the final payload (JSON dict or protobuf bytes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass

from tether.server.errors import error_body
from tether.types.errors import NotFoundError

REFETCH_WINDOW_S = 600.0
"""How long a delivered result can be fetched again."""
UNFETCHED_RETENTION_S = 24 * 3600.0
"""How long an undelivered result is kept for a client that never came back."""


@dataclass
class _Entry:
    owner: str
    future: concurrent.futures.Future
    created_at: float
    delivered_at: float | None = None


@dataclass(frozen=True)
class FutureOutcome:
    """What a poll found: `payload` is None while the operation is still running."""

    payload: dict | bytes | None
    failed: bool = False


class FutureStore:
    """request_id -> the concurrent future that will produce its payload; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def add(self, request_id: str, owner: str, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._entries[request_id] = _Entry(owner, future, time.monotonic())

    def has(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._entries

    def _entry(self, request_id: str, owner: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(request_id)
        if entry is None or entry.owner != owner:
            raise NotFoundError(f"unknown request_id {request_id!r} (results are kept {int(REFETCH_WINDOW_S)} s after delivery)")
        return entry

    async def wait(self, request_id: str, owner: str, timeout_s: float) -> FutureOutcome:
        """The outcome once ready, or an empty outcome after `timeout_s`."""
        entry = self._entry(request_id, owner)
        if not entry.future.done():
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(entry.future)), timeout_s)
            except TimeoutError:
                return FutureOutcome(None)
            except asyncio.CancelledError:
                if not entry.future.cancelled():  # this poll itself was cancelled (client went away)
                    raise
            except Exception:  # noqa: BLE001 - the failure is read from the future below
                pass
        with self._lock:
            entry.delivered_at = entry.delivered_at or time.monotonic()
        if entry.future.cancelled():
            return FutureOutcome({"error": f"request {request_id} was cancelled", "category": "user"}, failed=True)
        exc = entry.future.exception()
        if exc is not None:
            return FutureOutcome(error_body(exc), failed=True)
        return FutureOutcome(entry.future.result())

    def cancel(self, request_id: str, owner: str) -> bool:
        """Cancel the operation if it has not started; True if it will not run."""
        return self._entry(request_id, owner).future.cancel()

    def sweep(self, now: float | None = None) -> int:
        """Drop results delivered long ago or never fetched; returns how many were dropped."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [
                rid
                for rid, e in self._entries.items()
                if (e.delivered_at is not None and now - e.delivered_at > REFETCH_WINDOW_S)
                or (e.future.done() and now - e.created_at > UNFETCHED_RETENTION_S)
            ]
            for rid in stale:
                del self._entries[rid]
        return len(stale)
