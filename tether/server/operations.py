"""Submitting trainer ops: one request id, one future, deduplicated by `(stream, seq_id)`.

Every asynchronous route ends in `submit_op`: the op is queued on its base model's trainer before
the route answers (the SDK relies on that ordering), and a repeated `(stream, seq_id)` is answered
with the request id of the first submission, so a retried request never runs twice. When the op's
result arrives, the route's `finish` turns it into the response payload (JSON dict or protobuf
bytes) and records what it must in the catalogue, on the server's result thread: never on the
trainer's thread, never on the event loop.
"""

from __future__ import annotations

import concurrent.futures
import logging
import uuid
from collections.abc import Callable
from typing import Any

from tether.server.state import ServerState
from tether.trainer.interface import Trainer
from tether.types.ops import Op

log = logging.getLogger("tether.server")


def new_request_id(prefix: str) -> str:
    """`<prefix>-<server instance id>-<random>`: a poll after a restart is told the server restarted."""
    from tether.server.futures import current_instance_id  # (hardening hook: instance id in request ids)

    return f"{prefix}-{current_instance_id()}-{uuid.uuid4().hex[:20]}"


class _Payload(concurrent.futures.Future):
    """The future a client polls: `finish(result of source)`. Cancelling it cancels the op if not started."""

    def __init__(self, source: concurrent.futures.Future) -> None:
        super().__init__()
        self._source = source

    def cancel(self) -> bool:
        if not self._source.cancel():
            return False
        return super().cancel()


def chain(
    state: ServerState,
    source: concurrent.futures.Future,
    finish: Callable[[Any], Any] | None,
    on_error: Callable[[BaseException], None] | None = None,
    after: Callable[[Any], None] | None = None,
) -> concurrent.futures.Future:
    """A future of `finish(source's result)`, computed on the server's result thread.

    If the op fails or is cancelled, `on_error(exception)` runs there first (to undo what the route
    recorded). `after(source's result)` runs there once the payload is published: bookkeeping the
    client need not wait for (its failure is logged, the payload stands)."""
    payload = _Payload(source)

    def undo(exc: BaseException) -> None:
        if on_error is not None:
            try:
                on_error(exc)
            except BaseException:  # noqa: BLE001 - the op's own failure is what the client sees
                pass

    def complete(done: concurrent.futures.Future) -> None:
        if done.cancelled():  # e.g. cancel_future: it did not (or no longer does) run
            undo(concurrent.futures.CancelledError())
            payload.cancel()
            return
        if payload.done():
            return
        exc = done.exception()
        if exc is not None:
            undo(exc)
            payload.set_exception(exc)
            return
        try:
            payload.set_result(finish(done.result()) if finish is not None else done.result())
        except BaseException as err:  # noqa: BLE001 - reported through the future
            payload.set_exception(err)
            return
        if after is not None:
            try:
                after(done.result())
            except Exception:  # noqa: BLE001 - the client has its answer; bookkeeping failures are logged
                log.exception("bookkeeping after an operation failed")

    def on_done(done: concurrent.futures.Future) -> None:
        try:
            state.results.submit(complete, done)
        except RuntimeError:  # shutting down: answer on this thread
            complete(done)

    source.add_done_callback(on_done)
    return payload


def submit_op(
    state: ServerState,
    trainer: Trainer,
    op: Op,
    *,
    owner: str,
    kind: str,
    stream: str | None = None,
    seq_id: int | None = None,
    dedupe_stream: str | None = None,
    finish: Callable[[Any], Any] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    after: Callable[[Any], None] | None = None,
    request_id: str | None = None,
) -> str:
    """Queue `op` on `trainer` (in `stream`'s order) and return the request id that answers it.

    With a `seq_id`, a repeat of `(dedupe_stream or stream, seq_id)` returns the first request's id
    and queues nothing. `on_error` runs if the op fails (also when the trainer refuses it outright);
    `after` once its payload is published (see `chain`).
    """
    request_id = request_id or new_request_id(kind)
    key = dedupe_stream or stream
    if seq_id is not None and key is not None:
        earlier = state.dedupe.claim(key, seq_id, request_id)
        if earlier is not None:
            return earlier
    try:
        source = trainer.submit(op, stream=stream, seq_id=seq_id)
    except BaseException:
        if seq_id is not None and key is not None:
            state.dedupe.release(key, seq_id)
        raise
    state.futures.add(request_id, owner, chain(state, source, finish, on_error, after))
    return request_id
