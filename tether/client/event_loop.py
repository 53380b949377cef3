"""The background event loop on which all SDK network I/O runs.

The SDK is async inside and futures outside: one daemon thread per process runs an asyncio loop,
every HTTP exchange is a coroutine scheduled there, and callers get `APIFuture`s. So a plain script,
a notebook (which already runs its own loop) and an async application all use the same code path,
and a blocked caller never blocks the I/O of its other pending calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    """The process's SDK loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            threading.Thread(target=run, name="tether-client-loop", daemon=True).start()
            ready.wait()
            _loop = loop
        return _loop


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule `coro` on the SDK loop; its result arrives in the returned future."""
    return asyncio.run_coroutine_threadsafe(coro, background_loop())


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run `coro` on the SDK loop and wait for it (never call this from the SDK loop itself)."""
    return submit(coro).result(timeout)
