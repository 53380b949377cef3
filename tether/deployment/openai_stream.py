"""Token streaming for the OpenAI-compatible routes: server-sent events as tokens are generated.

A streamed request is submitted with an `on_token` callback (`tether.engine.sampling.engine.TokenCallback`)
that moves each token from the engine's thread onto the event loop; every token that makes new
text final becomes one `data:` chunk, and the request's end sends the rest and each choice's
`finish_reason`.

Text is released only once it is final, so the chunks concatenate to exactly the non-streamed text:
a trailing EOS token is held until it is known not to be the last one (the last is dropped, as in
the whole answer); nothing from the first stop string on is sent (the answer ends before it), and
an end of the text that begins a stop string waits for the next token; a trailing U+FFFD (a
character whose UTF-8 bytes span tokens) waits for its other bytes. Each chunk carries the
logprobs of the tokens whose text it releases (held tokens go with a later chunk).

A stream's requests live as long as its response: `CancellingStream` cancels those not finished
when the response ends, which under uvicorn happens as soon as the client disconnects (see
`tether.deployment.app`), so the engine stops generating for nobody and frees their KV cache.

This module knows the chunk shapes and the engine's callback, not the routes' request bodies.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tether.deployment.served import ServedWeights
from tether.engine.sampling import SampleRequest, SampleResult
from tether.engine.sampling.engine import TokenCallback
from tether.types.errors import TetherError

if TYPE_CHECKING:
    from tether.deployment.openai_routes import _Text

log = logging.getLogger("tether.deployment")

_HELD = "\ufffd"
_ANCHOR_EVERY = 32
_ANCHOR_TAIL = 4


def _stop_prefix_at_end(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins one of `stops` (text that must wait)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


@dataclass
class StreamToken:
    """One generated token of one sample (as the engine's callback reported it)."""

    token: int
    logprob: float
    topk: list[tuple[int, float]] | None


@dataclass
class ChoiceStream:
    """The text of one streamed choice, released as it becomes final (see the module docstring)."""

    text: _Text
    stops: list[str] | None
    tokens: list[StreamToken] = field(default_factory=list)
    emitted: str = ""
    reported: int = 0
    """Tokens whose logprobs went out with a chunk."""
    anchor: int = 0
    anchor_text: str = ""
    """decode(ids[:anchor]), and decode(ids) == anchor_text + decode(ids[anchor:]) (checked when
    the anchor moves), so each token decodes only the tail, not the whole answer again."""

    def _decode(self, ids: list[int]) -> str:
        decode = self.text.tokenizer.decode
        decoded = self.anchor_text + decode(ids[self.anchor :])
        split = len(ids) - _ANCHOR_TAIL
        if split - self.anchor >= _ANCHOR_EVERY:
            head = self.anchor_text + decode(ids[self.anchor : split])
            if head + decode(ids[split:]) == decoded:  # a clean split (not inside a character)
                self.anchor, self.anchor_text = split, head
        return decoded

    def add(self, token: StreamToken) -> tuple[str, list[StreamToken]]:
        """Record a token; returns the text now final (maybe "") and the tokens it covers."""
        self.tokens.append(token)
        ids = [t.token for t in self.tokens]
        if ids[-1] in self.text.eos:  # dropped if it ends the answer
            ids = ids[:-1]
        decoded = self._decode(ids)
        start = max(0, len(self.emitted) - max((len(s) for s in self.stops or []), default=0))
        cuts = [c for c in (decoded.find(s, start) for s in self.stops or []) if c >= 0]
        safe = min(cuts) if cuts else len(decoded) - _stop_prefix_at_end(decoded, self.stops or [])
        while safe > len(self.emitted) and decoded[safe - 1] == _HELD:
            safe -= 1
        if safe <= len(self.emitted) or not decoded.startswith(self.emitted):
            return "", []
        new, self.emitted = decoded[len(self.emitted) : safe], decoded[:safe]
        covered, self.reported = self.tokens[self.reported : len(ids)], max(self.reported, len(ids))
        return new, covered

    def finish(self, final_text: str, kept: int) -> tuple[str, list[StreamToken]]:
        """The rest of the answer once it is complete: its whole text, and how many tokens it keeps."""
        if not final_text.startswith(self.emitted):  # pragma: no cover - a tokenizer that re-decodes
            log.warning("streamed text diverged from the final text; sending the rest as decoded")
        rest = final_text[len(self.emitted) :]
        self.emitted = final_text
        covered = self.tokens[self.reported : kept]
        self.reported = max(self.reported, kept)
        return rest, covered


@dataclass
class DoneEvent:
    request: int
    future: Future[SampleResult]


@dataclass
class TokenEvent:
    request: int
    sample: int
    token: StreamToken


Event = TokenEvent | DoneEvent


@dataclass
class ChoicePiece:
    """Text of choice `index` now final, the tokens it covers, and (last) the choice's finish reason."""

    index: int
    text: str
    covered: list[StreamToken]
    finish: str | None = None
    completion_tokens: int = 0
    """On the finishing piece: the tokens the choice generated (for the usage chunk)."""


async def choice_pieces(
    events: AsyncIterator[Event], streams: list[ChoiceStream], n: int, text: _Text, stops: list[str] | None
) -> AsyncIterator[ChoicePiece | Exception]:
    """Each choice's text as it becomes final, then its rest and finish reason when its request ends;
    choice `request * n + sample` is `streams[...]`. A request that failed ends the pieces with its
    error (streaming had begun, so the route reports it in the stream)."""
    async for event in events:
        if isinstance(event, TokenEvent):
            index = event.request * n + event.sample
            piece, covered = streams[index].add(event.token)
            if piece:
                yield ChoicePiece(index, piece, covered)
            continue
        try:
            result = event.future.result()
        except Exception as exc:  # noqa: BLE001 - handed to the route, which ends the stream with it
            yield exc
            return
        for i, seq in enumerate(result.sequences):
            index = event.request * n + i
            kept, final_text = text.completion(seq, stops)
            piece, covered = streams[index].finish(final_text, len(kept))
            if piece or covered:
                yield ChoicePiece(index, piece, covered)
            yield ChoicePiece(index, "", [], seq.stop_reason, len(seq.tokens))


async def submit_streaming(
    served: ServedWeights, requests: list[SampleRequest]
) -> tuple[str, AsyncIterator[Event], list[Future[SampleResult]]]:
    """Submit every request with a per-token callback; returns the weights identity, the events and
    the requests' futures (for `CancellingStream`).

    All requests are queued together on one weights version (`ServedWeights.submit_many`). Raises
    what it raises (bad request, overload) before anything is streamed, having cancelled the
    requests already queued. Events come in generation order: each request's tokens, then its
    `DoneEvent` with the future.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (client and server shut down)
            pass

    def callback(request: int) -> Callable[[int, int, float, list[tuple[int, float]] | None], None]:
        def on_token(sample: int, token: int, logprob: float, topk: list[tuple[int, float]] | None) -> None:
            put(TokenEvent(request, sample, StreamToken(token, logprob, topk)))

        return on_token

    callbacks: list[TokenCallback | None] = [callback(number) for number in range(len(requests))]
    futures, identity = await asyncio.to_thread(served.submit_many, requests, callbacks)

    def done(request: int) -> Callable[[Future[SampleResult]], None]:
        return lambda future: put(DoneEvent(request, future))

    for number, future in enumerate(futures):
        future.add_done_callback(done(number))

    async def events() -> AsyncIterator[Event]:
        remaining = len(futures)
        while remaining:
            event = await queue.get()
            if isinstance(event, DoneEvent):
                remaining -= 1
            yield event

    return identity, events(), futures


class CancellingStream(StreamingResponse):
    """A streamed answer that cancels its requests' unfinished futures once it ends, however it
    ends: sent in full (nothing left to cancel), failed, or cut short because the client went away
    (Starlette then cancels the body while it waits for the next token, and returns here)."""

    def __init__(
        self, content: AsyncIterator[str], futures: list[Future[SampleResult]], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self.futures = futures

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for future in self.futures:
                future.cancel()  # a no-op for finished ones


def error_chunk(exc: BaseException) -> dict[str, Any]:
    """The `data:` payload that ends a stream whose request failed after streaming began."""
    message = exc.message if isinstance(exc, TetherError) else f"sampling failed: {type(exc).__name__}"
    category = exc.category if isinstance(exc, TetherError) else "server"
    return {"error": {"message": message, "type": category}}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
