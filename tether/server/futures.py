"""Futures of queued operations, fetched by long-polling `retrieve_future`.

Submitting an operation answers `{"request_id"}` at once; the client then polls. A poll is held until
the result exists or `long_poll_s` passes (then `try_again`), so a waiting client costs one request
per ~25 s, not a hot loop. Results stay until fetched and a while after (a client re-fetches after a
network error); the operation's result is already the final payload (JSON dict or protobuf bytes).

Request ids carry the id of the server instance that issued them (`new_request_id` in
`tether.server.operations` reads it from `current_instance_id()`), so a poll for a request made to an
earlier run of the server answers at once that the server restarted and the request is lost, instead
of "unknown request_id". A failed operation's exception is turned into its error body as soon as it
fails and then dropped, so a failed request's data (kept alive by the traceback's frames) is freed
then, not when the result expires.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import re
import secrets
import threading
import time
from dataclasses import dataclass

from tether.server.errors import error_body
from tether.types.errors import NotFoundError, TetherError

REFETCH_WINDOW_S = 600.0
"""How long a delivered result can be fetched again."""
UNFETCHED_RETENTION_S = 24 * 3600.0
"""How long an undelivered result is kept for a client that never came back."""


PROCESS_INSTANCE_ID = secrets.token_hex(4)
"""The instance id of request ids made outside any server's request (8 hex digits)."""

_current_instance: contextvars.ContextVar[str] = contextvars.ContextVar("tether_instance_id")
_INSTANCE_IN_REQUEST_ID = re.compile(r"-(?P<instance>[0-9a-f]{8})-[0-9a-f]+$")


def current_instance_id() -> str:
    """The id of the server instance handling the current request (set per request by the app's
    middleware), else this process's."""
    return _current_instance.get(PROCESS_INSTANCE_ID)


def set_current_instance_id(instance_id: str) -> contextvars.Token:
    return _current_instance.set(instance_id)


def reset_current_instance_id(token: contextvars.Token) -> None:
    _current_instance.reset(token)


def instance_of_request_id(request_id: str) -> str | None:
    """The server instance a request id names (`<kind>-<instance>-<random>`); None for other ids."""
    match = _INSTANCE_IN_REQUEST_ID.search(request_id)
    return match.group("instance") if match else None


@dataclass
class _Entry:
    owner: str
    future: concurrent.futures.Future
    created_at: float
    delivered_at: float | None = None
    failure: dict | None = None
    """The error body of a failed operation (its exception, and what it held, already released)."""


@dataclass(frozen=True)
class FutureOutcome:
    """What a poll found: `payload` is None while the operation is still running."""

    payload: dict | bytes | None
    failed: bool = False


class FutureStore:
    """request_id -> the concurrent future that will produce its payload; thread-safe."""

    def __init__(self, instance_id: str | None = None) -> None:
        self.instance_id = instance_id or secrets.token_hex(4)
        """This server run's id (8 hex digits), part of every request id it issues."""
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def add(self, request_id: str, owner: str, future: concurrent.futures.Future) -> None:
        entry = _Entry(owner, future, time.monotonic())
        with self._lock:
            self._entries[request_id] = entry
        future.add_done_callback(lambda done: _release_failure(entry, done))

    def has(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._entries

    def _entry(self, request_id: str, owner: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(request_id)
        if entry is None or entry.owner != owner:
            issued_by = instance_of_request_id(request_id)
            if entry is None and issued_by is not None and issued_by != self.instance_id:
                raise ServerRestartedError(
                    f"request {request_id} was made to an earlier run of this server (instance {issued_by}), "
                    f"which has since restarted (now instance {self.instance_id}): its result is lost; "
                    "send the request again"
                )
            raise NotFoundError(
                f"unknown request_id {request_id!r} (results are kept {int(REFETCH_WINDOW_S)} s after delivery)"
            )
        return entry

    async def wait(self, request_id: str, owner: str, timeout_s: float) -> FutureOutcome:
        """The outcome once ready, or an empty outcome after `timeout_s`.

        A request made to an earlier run of the server is a failed outcome (category server) at once.
        """
        try:
            entry = self._entry(request_id, owner)
        except ServerRestartedError as exc:
            return FutureOutcome({"error": exc.message, "category": exc.category}, failed=True)
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
            return FutureOutcome(
                {"error": f"request {request_id} was cancelled", "category": "user"}, failed=True
            )
        failure = _release_failure(entry, entry.future)
        if failure is not None:
            return FutureOutcome(failure, failed=True)
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


class ServerRestartedError(TetherError):
    """A request id names an earlier run of this server: the request and its result were lost."""

    http_status = 410
    category = "server"


_release_lock = threading.Lock()


def _release_failure(entry: _Entry, future: concurrent.futures.Future) -> dict | None:
    """The failed operation's error body, made once; the exception and its frames are then dropped."""
    with _release_lock:
        if entry.failure is not None:
            return entry.failure
        if future.cancelled() or not future.done():
            return None
        exc = future.exception()
        if exc is None:
            return None
        entry.failure = error_body(exc)  # logs unexpected errors with their traceback first
        seen: set[int] = set()
        while exc is not None and id(exc) not in seen:  # the frames are what hold the request's data
            seen.add(id(exc))
            exc.__traceback__ = None
            exc = exc.__cause__ or exc.__context__
        settled: concurrent.futures.Future = concurrent.futures.Future()
        settled.set_result(None)  # the failure body above is what polls read from now on
        entry.future = settled
        return entry.failure
