"""One client session with a server: the session id, its heartbeat and its id counters.

A `ClientSession` is shared by a ServiceClient and every training and sampling client made from it.
It creates the server-side session on first use (nothing is sent before), keeps it alive with a
heartbeat every 10 s, hands out `model_seq_id`s and `sampling_session_seq_id`s, and finishes the
session on `close()`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from tether.client import event_loop, routes
from tether.client.api_future import APIFuture
from tether.client.transport import SDK_VERSION, Transport
from tether.types.errors import NotFoundError, TetherError
from tether.types.wire import (
    CreateSessionRequest,
    FinishReason,
    SessionFinishRequest,
    SessionHeartbeatRequest,
    make_wire,
)

log = logging.getLogger("tether.client")

T = TypeVar("T")

HEARTBEAT_INTERVAL_S = 10.0


class ClientSession:
    """Session state shared by the clients of one ServiceClient."""

    def __init__(
        self,
        transport: Transport,
        *,
        user_metadata: dict[str, Any] | None = None,
        project_id: str | None = None,
        display_name: str | None = None,
    ) -> None:
        self.transport = transport
        self._user_metadata = dict(user_metadata or {})
        self._project_id = project_id
        self._display_name = display_name
        self._session_id: str | None = None
        self._session_lock: asyncio.Lock | None = None
        self._heartbeat: asyncio.Task | None = None
        self._model_seq = itertools.count()
        self._sampling_seq = itertools.count()
        self._counter_lock = threading.Lock()
        self.closed = False

    # ---- running work on the SDK loop

    def run(
        self, coro: Coroutine[Any, Any, T], description: str, future_cls: type[APIFuture] = APIFuture
    ) -> APIFuture[T]:
        """Schedule `coro` on the SDK loop and hand back its APIFuture (or `future_cls`)."""
        return future_cls(self.spawn(coro), description)

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        return event_loop.run_sync(coro)

    def spawn(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self.closed:
            coro.close()
            raise TetherError("this client has been closed")
        return event_loop.submit(coro)

    # ---- ids

    def next_model_seq_id(self) -> int:
        with self._counter_lock:
            return next(self._model_seq)

    def next_sampling_session_seq_id(self) -> int:
        with self._counter_lock:
            return next(self._sampling_seq)

    # ---- the server-side session

    async def session_id(self) -> str:
        """The server session, created on first use (runs on the SDK loop)."""
        if self._session_id is not None:
            return self._session_id
        if self._session_lock is None:
            self._session_lock = asyncio.Lock()
        async with self._session_lock:
            if self._session_id is None:
                body = make_wire(
                    CreateSessionRequest,
                    tags=[],
                    user_metadata=self._user_metadata,
                    sdk_version=SDK_VERSION,
                    project_id=self._project_id,
                    display_name=self._display_name,
                )
                self._session_id = (await self.transport.call(routes.CREATE_SESSION, body)).session_id
                self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())
        return self._session_id

    async def _heartbeat_loop(self) -> None:
        body = SessionHeartbeatRequest(session_id=str(self._session_id))
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            try:
                await self.transport.call(routes.SESSION_HEARTBEAT, body, retry=False)
            except NotFoundError:
                log.warning("session %s is gone on the server; heartbeat stopped", self._session_id)
                return
            except TetherError as exc:
                log.debug("heartbeat failed: %s", exc)

    async def aclose(self, status: str = "success", detail: str | None = None) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._session_id is not None:
            try:
                body = make_wire(
                    SessionFinishRequest, reason=make_wire(FinishReason, type=status), detail=detail
                )
                await self.transport.call(
                    routes.SESSION_FINISH.at(session_id=self._session_id), body, retry=False
                )
            except TetherError as exc:
                log.debug("finishing session %s failed: %s", self._session_id, exc)
        await self.transport.aclose()

    def close(self, status: str = "success", detail: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            event_loop.run_sync(self.aclose(status, detail), timeout=10.0)
        except (TetherError, concurrent.futures.TimeoutError) as exc:
            log.debug("closing the session failed: %s", exc)
