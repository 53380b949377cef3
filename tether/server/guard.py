"""The gate every HTTP request passes before any route sees it (an ASGI middleware).

In this order, before a byte of the body is read: the API key of an `/api/` request is checked (401
for a missing or unknown key, so an unauthenticated client cannot make the server buffer or parse
anything), and a declared `Content-Length` above `max_request_body_bytes` is answered 413. Then the
body is read with a running total and answered 413 the moment it streams past the limit. A
`Content-Encoding: zstd` body is decompressed here, on a worker thread and at most
`max_decoded_body_bytes`, so routes always see plain bytes and no decompression runs on the event
loop. Finally the request runs with the server's instance id as the current one, so the request
ids it makes name this server run (`tether.server.futures`).

It knows headers, sizes and encodings; what a body means is the routes' business.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Request

from tether.server.auth import api_key_from_headers
from tether.server.config import ServerConfig
from tether.server.errors import error_response
from tether.server.futures import reset_current_instance_id, set_current_instance_id
from tether.server.state import ServerState
from tether.types.errors import PayloadTooLargeError, TetherError, UserInputError
from tether.types.proto import ForwardBackwardRequestBody, decode_forward_backward_request
from tether.types.proto_tensors import decompress_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PUBLIC_API_PATHS = frozenset({"/api/v1/healthz", "/api/v1/client/config"})
"""`/api/` routes that answer without an API key (the SDK asks for its config before it has one)."""

_DECODE_SLOTS = 2
"""Decompressions running at once (each may hold up to `max_decoded_body_bytes`)."""


class RequestGuard:
    """ASGI middleware: authentication before the body, bounded bodies, zstd decoded off the loop."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, state: ServerState) -> None:
        self.app = app
        self.state = state
        self._decode_slots = asyncio.Semaphore(_DECODE_SLOTS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = set_current_instance_id(self.state.futures.instance_id)
        try:
            try:
                self._authenticate(scope)
                receive = await self._bounded_body(scope, receive)
            except TetherError as exc:
                await error_response(exc)(scope, receive, send)
                return
            await self.app(scope, receive, send)
        finally:
            reset_current_instance_id(token)

    def _authenticate(self, scope: Scope) -> None:
        path: str = scope.get("path", "")
        if not path.startswith("/api/") or path.rstrip("/") in PUBLIC_API_PATHS:
            return
        key = api_key_from_headers(_header(scope, b"x-api-key"), _header(scope, b"authorization"))
        self.state.auth.owner(key)  # raises AuthenticationError (401)

    async def _bounded_body(self, scope: Scope, receive: Receive) -> Receive:
        """Read the whole body (at most the limit) and return a `receive` that replays it decoded."""
        limit = self.state.config.max_request_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        total = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _replay(None, receive)
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise _too_large(limit)
            if chunk:
                chunks.append(chunk)
            more = message.get("more_body", False)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        del chunks
        encoding = (_header(scope, b"content-encoding") or "").strip().lower()
        if encoding not in ("", "identity"):
            if encoding != "zstd":
                raise UserInputError(f"unsupported Content-Encoding {encoding!r}", field="content-encoding")
            async with self._decode_slots:
                body = await asyncio.to_thread(
                    decompress_body, body, encoding, max_bytes=self.state.config.max_decoded_body_bytes
                )
            _replace_headers(scope, body)
        return _replay(body, receive)


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"request body is larger than this server accepts ({limit} bytes)")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _replace_headers(scope: Scope, body: bytes) -> None:
    """The body is decoded now: drop its encoding and state its new length."""
    headers = [
        (k, v)
        for k, v in scope.get("headers", ())
        if k.lower() not in (b"content-encoding", b"content-length")
    ]
    headers.append((b"content-length", str(len(body)).encode()))
    scope["headers"] = headers


def _replay(body: bytes | None, original: Receive) -> Receive:
    """The body as one message, then the client's own messages (its disconnect); None: it left."""
    pending = body

    async def receive() -> Message:
        nonlocal pending
        if pending is not None:
            message = {"type": "http.request", "body": pending, "more_body": False}
            pending = None
            return message
        if body is None:
            return {"type": "http.disconnect"}
        return await original()

    return receive


async def decode_forward_backward_body(request: Request, config: ServerConfig) -> ForwardBackwardRequestBody:
    """The posted `ForwardBackwardRequest`, parsed on a worker thread (not the event loop), its
    sparse tensors densifying to at most `max_decoded_body_bytes` in all.

    The guard has already bounded and decompressed the body. Raises UserInputError like
    `decode_forward_backward_request`.
    """
    body = await request.body()
    return await asyncio.to_thread(
        decode_forward_backward_request,
        body,
        request.headers.get("content-encoding"),
        max_decompressed_bytes=config.max_decoded_body_bytes,
        max_dense_bytes=config.max_decoded_body_bytes,
    )
