"""`APIFuture`: the one handle every SDK call returns, usable from sync and async code alike.

The SDK runs its network I/O on a background event loop (see `event_loop.py`); an APIFuture wraps
the `concurrent.futures.Future` of that work. `.result()` blocks a plain thread, `await` suspends a
coroutine on any event loop, and done callbacks fire on completion.

A failure must never vanish silently: if an APIFuture fails and is garbage-collected without its
error having been read (`result`, `exception`, `await`), the error is logged on the `tether.client`
logger with its traceback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

log = logging.getLogger("tether.client")

T = TypeVar("T")


class _FailureReporter:
    """Logs a failure once, if nobody read it and the future's owner is gone."""

    __slots__ = ("lock", "retrieved", "orphaned", "reported", "description")

    def __init__(self, description: str) -> None:
        self.lock = threading.Lock()
        self.retrieved = False
        self.orphaned = False
        self.reported = False
        self.description = description

    def on_done(self, cf: concurrent.futures.Future) -> None:
        if self.orphaned:
            self.report(cf)

    def report(self, cf: concurrent.futures.Future) -> None:
        if cf.cancelled():
            return
        exc = cf.exception()
        with self.lock:
            if exc is None or self.retrieved or self.reported:
                return
            self.reported = True
        log.error(
            "%s failed and its error was never retrieved: %s: %s",
            self.description,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )


class APIFuture(Generic[T]):
    """The eventual result of an SDK call: `.result(timeout=None)`, `await`, `add_done_callback`."""

    def __init__(self, cf: concurrent.futures.Future, description: str = "tether request") -> None:
        self._cf = cf
        self._reporter = _FailureReporter(description)
        cf.add_done_callback(self._reporter.on_done)

    def result(self, timeout: float | None = None) -> T:
        """Block until done and return the value, or raise the call's error (TimeoutError on timeout)."""
        self._reporter.retrieved = True
        return self._cf.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        self._reporter.retrieved = True
        return await asyncio.wait_for(asyncio.wrap_future(self._cf), timeout)

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._reporter.retrieved = True
        return self._cf.exception(timeout)

    def done(self) -> bool:
        return self._cf.done()

    def cancel(self) -> bool:
        return self._cf.cancel()

    def future(self) -> concurrent.futures.Future:
        """The underlying `concurrent.futures.Future` (reading it counts as retrieving)."""
        self._reporter.retrieved = True
        return self._cf

    def add_done_callback(self, fn: Callable[[APIFuture[T]], Any]) -> None:
        """Call `fn(self)` when the call finishes (at once if it already has)."""
        self._cf.add_done_callback(lambda _cf: fn(self))

    def __del__(self) -> None:
        reporter = getattr(self, "_reporter", None)
        if reporter is None:
            return
        reporter.orphaned = True
        if self._cf.done():
            reporter.report(self._cf)

    def __repr__(self) -> str:
        state = "done" if self._cf.done() else "pending"
        return f"<APIFuture {self._reporter.description} {state}>"


def completed_future(value: T, description: str = "tether request") -> APIFuture[T]:
    """An APIFuture that is already resolved (for results known without a round trip)."""
    cf: concurrent.futures.Future = concurrent.futures.Future()
    cf.set_result(value)
    return APIFuture(cf, description)


class ClientFuture(APIFuture[T]):
    """The future of a new client that can also be used as the client itself.

    The Tinker SDK's client-creating methods return such a future, so both spellings port:
    `sc.create_lora_training_client(...).result().forward(...)` and the direct
    `sc.create_lora_training_client(...).forward(...)` (which waits for the client first).
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.result(), name)
