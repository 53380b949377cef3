"""HTTP to a Tinker-protocol server: auth, retries, typed errors and the futures long-poll.

This is the SDK's one seam to the network. Everything above it deals in JSON dicts, protobuf bytes
and tether's typed errors; everything HTTP-specific (status codes, headers, backoff, the
`retrieve_future` state machine of tinker-protocol.md §4) stays here.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import httpx

from tether.types.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    OverloadedError,
    ServerError,
    TetherError,
    UserInputError,
)

log = logging.getLogger("tether.client")

PROTOBUF = "application/x-protobuf"
SDK_VERSION = "tether-0.1.0"

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


def make_error(cls: type[TetherError], message: str, category: str | None = None) -> TetherError:
    """A typed error carrying the server's message and failure category."""
    exc = cls(message)
    if category is not None:
        exc.category = category
    return exc


def error_from_response(response: httpx.Response) -> TetherError:
    """The typed error for a non-2xx answer, with the server's `detail` as its message."""
    message = response.text or response.reason_phrase
    category = None
    try:
        body = response.json()
        if isinstance(body, dict):
            message = str(body.get("detail") or body.get("error") or message)
            category = body.get("category")
    except ValueError:
        pass
    cls = _ERROR_BY_STATUS.get(response.status_code, ServerError if response.status_code >= 500 else TetherError)
    return make_error(cls, f"HTTP {response.status_code}: {message}", category)


def error_from_failed_future(body: dict[str, Any]) -> TetherError:
    """A failed future `{"error", "category"}`: the caller's fault is a UserInputError."""
    category = str(body.get("category", "unknown"))
    cls = UserInputError if category == "user" else ServerError
    return make_error(cls, str(body.get("error")), category)


def _backoff_s(attempt: int) -> float:
    return min(0.25 * 2**attempt, 8.0) * random.uniform(0.75, 1.0)


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

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        retry: bool = True,
    ) -> httpx.Response:
        """Send one request, retrying 408/429/5xx and connection errors with backoff; raise typed errors.

        Retrying submits is safe: the server deduplicates by (model_id, seq_id).
        """
        attempts = self.max_retries if retry else 0
        for attempt in range(attempts + 1):
            try:
                response = await self._http().request(
                    method, path, json=json, content=content, headers=headers, params=params
                )
            except httpx.TransportError as exc:
                if attempt >= attempts:
                    raise ServerError(f"cannot reach {self.base_url}{path}: {type(exc).__name__}: {exc}") from exc
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

    async def post_json(self, path: str, body: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        response = await self.request("POST", path, json=body if body is not None else {}, **kwargs)
        return response.json() if response.content else None

    async def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return (await self.request("GET", path, params=params)).json()

    async def retrieve_future(self, request_id: str, *, expect_proto: bool) -> bytes | dict[str, Any]:
        """Long-poll `retrieve_future` until the result exists; a failed future raises its typed error."""
        headers = {"Accept": PROTOBUF} if expect_proto else {"Accept": "application/json"}
        body = {"request_id": request_id, "allow_metadata_only": False}
        failures = 0
        while True:
            try:
                response = await self._http().post(
                    "/api/v1/retrieve_future", json=body, headers=headers, timeout=httpx.Timeout(75.0, connect=5.0)
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

    async def submit_and_wait(
        self,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        expect_proto: bool = False,
    ) -> tuple[dict[str, Any], bytes | dict[str, Any]]:
        """Post an async operation, then wait for its future. Returns (submit answer, result)."""
        response = await self.request("POST", path, json=json, content=content, headers=headers)
        submitted = response.json()
        result = await self.retrieve_future(submitted["request_id"], expect_proto=expect_proto)
        return submitted, result
