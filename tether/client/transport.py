"""HTTP to a Tinker-protocol server: the one call every SDK request goes through.

`Transport.call(route, body)` encodes the body (the JSON of a wire model, or protobuf), posts it
with auth and retries, long-polls `retrieve_future` for a route answered by a future, and decodes
the answer into the route's typed result; errors come back as tether's typed errors. This is the
SDK's one seam to the network: everything HTTP-specific (status codes, headers, backoff, the
`retrieve_future` state machine of tinker-protocol.md §4) stays here, and nothing above it sees a
dict or a status code. Large bodies and answers (tensors, protobuf) are encoded and decoded on a
worker thread, so a large batch never stalls the SDK loop that serves every other pending call
(event_loop.py); small ones stay on the loop, where they cost less than the thread hop.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import httpx
from google.protobuf.message import DecodeError

from tether.client.routes import RETRIEVE_FUTURE, Route
from tether.types import proto
from tether.types.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    OverloadedError,
    ServerError,
    TetherError,
    UserInputError,
)
from tether.types.wire import FutureRetrieveRequest, UntypedAPIFuture, WireModel

log = logging.getLogger("tether.client")

T = TypeVar("T")

PROTOBUF = "application/x-protobuf"
SDK_VERSION = "tether-0.1.0"

OFF_LOOP_MIN_BYTES = 256 * 1024
"""Bodies and answers at least this large are encoded / decoded on a worker thread (at ~1 GB/s a
smaller one takes well under a millisecond, less than the hop to a thread on a loaded machine)."""

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
_ERROR_BY_STATUS: dict[int, type[TetherError]] = {
    400: UserInputError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    410: NotFoundError,
    422: UserInputError,
    429: OverloadedError,
}


def make_error(
    cls: type[TetherError], message: str, category: str | None = None, body: dict[str, Any] | None = None
) -> TetherError:
    """A typed error carrying the server's message and failure category; a `UserInputError` also
    carries the `field` and `datum_index` the server's JSON `body` names."""
    exc = cls(message)  # the server's message already names the field and datum
    if isinstance(exc, UserInputError) and body is not None:
        field, datum = body.get("field"), body.get("datum_index")
        exc.field = field if isinstance(field, str) else None
        exc.datum_index = datum if isinstance(datum, int) and not isinstance(datum, bool) else None
    if category is not None:
        exc.category = category
    return exc


def error_from_response(response: httpx.Response) -> TetherError:
    """The typed error for a non-2xx answer, with the server's `detail` as its message."""
    message = response.text or response.reason_phrase
    category = None
    body: dict[str, Any] | None = None
    try:
        decoded = response.json()
        if isinstance(decoded, dict):
            body = decoded
            message = str(body.get("detail") or body.get("error") or message)
            category = body.get("category")
    except ValueError:
        pass
    cls = _ERROR_BY_STATUS.get(
        response.status_code, ServerError if response.status_code >= 500 else TetherError
    )
    return make_error(cls, f"HTTP {response.status_code}: {message}", category, body)


def error_from_failed_future(body: dict[str, Any]) -> TetherError:
    """A failed future `{"error", "category"}`: the caller's fault is a UserInputError."""
    category = str(body.get("category", "unknown"))
    cls = UserInputError if category == "user" else ServerError
    return make_error(cls, str(body.get("error")), category, body)


def _backoff_s(attempt: int) -> float:
    return min(0.25 * 2**attempt, 8.0) * random.uniform(0.75, 1.0)


class Turn(Protocol):
    """A place in a client's submission order (TrainingClient's seq_ids)."""

    async def wait(self) -> None:
        """Return once every earlier request of the client has been posted."""

    def done(self) -> None:
        """Let the next request be posted (never before the earlier ones)."""


class Transport:
    """An httpx.AsyncClient bound to one server and key; lives on the SDK's background loop."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        max_retries: int = 8,
        timeout_s: float = 60.0,
        http_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.max_retries = max_retries
        self._timeout = httpx.Timeout(timeout_s, connect=5.0)
        self._http_transport = http_transport
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        # Created lazily so that it binds to the loop that uses it (the SDK loop).
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers={"X-API-Key": self.api_key, "User-Agent": f"tether-sdk/{SDK_VERSION}"},
                timeout=self._timeout,
                transport=self._http_transport,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def call(
        self,
        route: Route[T],
        body: Any = None,
        *,
        params: dict[str, Any] | None = None,
        turn: Turn | None = None,
        retry: bool = True,
    ) -> T:
        """Send one request and return the route's typed result (None where the answer is ignored).

        `body` must be an instance of `route.request` (None for a route without a body); `params`
        is the query string. With `turn`, the post waits for the client's earlier requests (the
        body is encoded before, concurrently with them) and the turn is released once this post
        is answered or has failed, so results are awaited concurrently but submitted in order.
        408/429/5xx and connection errors are retried with backoff (`retry=False`: not at all);
        retrying a submit is safe, the server deduplicates by (model_id, seq_id).

        Raises the typed error of an HTTP error or a failed future (UserInputError, NotFoundError,
        ServerError, ...), ServerError for an answer that does not decode, TypeError for a body of
        the wrong type (an SDK bug).
        """
        expected = route.request
        if (body is None) != (expected is None) or (expected is not None and not isinstance(body, expected)):
            raise TypeError(f"{route.method} {route.path} takes {expected}, got {type(body).__name__}")
        try:
            large_body = route.body_nbytes is not None and route.body_nbytes(body) >= OFF_LOOP_MIN_BYTES
            content, headers = await _maybe_off_loop(large_body, _encode, route, body)
            if turn is not None:
                await turn.wait()
            response = await self._send(route.method, route.path, content, headers, params, retry)
        finally:
            if turn is not None:
                turn.done()
        submitted = None
        if route.future:
            submitted = _decoded(route, lambda: UntypedAPIFuture.model_validate(response.json()))
            answer: Any = await self._retrieve(submitted.request_id, expect_proto=route.proto_result)
        elif route.raw_result:
            answer = response.content
        else:
            answer = _decoded(route, response.json) if response.content and route.decode else None
        if route.decode is None:
            return None  # type: ignore[return-value]
        decode = route.decode
        large_answer = isinstance(answer, bytes) and len(answer) >= OFF_LOOP_MIN_BYTES
        return await _maybe_off_loop(large_answer, _decoded, route, lambda: decode(answer, submitted))

    async def _send(
        self,
        method: str,
        path: str,
        content: bytes | None,
        headers: dict[str, str],
        params: dict[str, Any] | None,
        retry: bool,
    ) -> httpx.Response:
        """One request, retrying 408/429/5xx and connection errors with backoff; typed errors."""
        attempts = self.max_retries if retry else 0
        for attempt in range(attempts + 1):
            try:
                response = await self._http().request(
                    method, path, content=content, headers=headers, params=params
                )
            except httpx.TransportError as exc:
                if attempt >= attempts:
                    raise ServerError(
                        f"cannot reach {self.base_url}{path}: {type(exc).__name__}: {exc}"
                    ) from exc
                await asyncio.sleep(_backoff_s(attempt))
                continue
            if response.is_success:
                return response
            should_retry = response.headers.get("x-should-retry", "").lower() != "false"
            if response.status_code in _RETRYABLE_STATUS and should_retry and attempt < attempts:
                await asyncio.sleep(_backoff_s(attempt))
                continue
            raise error_from_response(response)
        raise AssertionError("unreachable")

    async def _retrieve(self, request_id: str, *, expect_proto: bool) -> bytes | Any:
        """Long-poll `retrieve_future` until the result exists; a failed future raises its typed error."""
        content, headers = _encode(RETRIEVE_FUTURE, FutureRetrieveRequest(request_id=request_id))
        headers["Accept"] = PROTOBUF if expect_proto else "application/json"
        failures = 0
        while True:
            try:
                response = await self._http().post(
                    RETRIEVE_FUTURE.path,
                    content=content,
                    headers=headers,
                    timeout=httpx.Timeout(75.0, connect=5.0),
                )
            except httpx.TransportError as exc:
                failures += 1
                if failures > self.max_retries:
                    raise ServerError(f"lost contact while waiting for {request_id}: {exc}") from exc
                await asyncio.sleep(_backoff_s(failures))
                continue
            status = response.status_code
            if status == 408 or status >= 500:
                # 408 is a long-poll timeout; 5xx may be transient. A short pause avoids a hot loop.
                failures += status >= 500
                if failures > self.max_retries:
                    raise error_from_response(response)
                await asyncio.sleep(0.05 if status == 408 else _backoff_s(failures))
                continue
            if status == 429:
                failures += 1
                await asyncio.sleep(_backoff_s(failures))
                continue
            if not response.is_success:
                raise error_from_response(response)
            if PROTOBUF in response.headers.get("content-type", ""):
                return response.content
            payload = response.json()
            if isinstance(payload, dict) and payload.get("type") == "try_again":
                continue
            if isinstance(payload, dict) and "error" in payload:
                raise error_from_failed_future(payload)
            if expect_proto:
                raise ServerError(f"expected a protobuf result for {request_id}, got JSON")
            return payload


async def _maybe_off_loop(off_loop: bool, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a worker thread when `off_loop`, else here on the SDK loop."""
    if off_loop:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _encode(route: Route[Any], body: Any) -> tuple[bytes | None, dict[str, str]]:
    """The bytes and content type of `body`: protobuf for forward_backward, JSON for a wire model.

    JSON omits None fields, as the Tinker SDK sends them.
    """
    if body is None:
        return None, {}
    if route.proto_request:
        return proto.encode_forward_backward_request(body), {"Content-Type": PROTOBUF}
    assert isinstance(body, WireModel)
    return body.model_dump_json(exclude_none=True, by_alias=True).encode(), {
        "Content-Type": "application/json"
    }


def _decoded(route: Route[Any], decode: Callable[[], T]) -> T:
    """`decode()`, with an answer that does not decode reported as the server's fault."""
    try:
        return decode()
    except (ValueError, DecodeError, UserInputError) as exc:
        raise ServerError(f"malformed answer from {route.method} {route.path}: {exc}") from exc
