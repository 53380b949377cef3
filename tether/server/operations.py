"""Submitting queued operations: one request id, one future, deduplicated by `(stream, seq_id)`.

Every asynchronous Tinker route ends here. The operation is queued on its model's worker before the
route answers (the SDK relies on that ordering), and a repeated `(model_id, seq_id)` is answered
with the request id of the first submission, so a retried request never runs twice.
"""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Callable
from typing import Any

from tether.engine.worker import DedupeRegistry, ModelWorker
from tether.server.state import ServerState


def new_request_id(prefix: str) -> str:
    """`<prefix>-<server instance id>-<random>`: a poll after a restart is told the server restarted."""
    from tether.server.futures import current_instance_id  # (hardening hook: instance id in request ids)

    return f"{prefix}-{current_instance_id()}-{uuid.uuid4().hex[:20]}"


def submit_to_worker(
    state: ServerState,
    worker: ModelWorker,
    *,
    owner: str,
    stream: str,
    seq_id: int | None,
    run: Callable[[], Any],
    kind: str,
    request_id: str | None = None,
) -> str:
    """Queue `run` on `worker` in `stream`'s order; returns the request id that answers it."""
    request_id = request_id or new_request_id(kind)
    submission = worker.submit(stream, seq_id, request_id, run)
    if not submission.duplicate:
        assert submission.future is not None
        state.futures.add(request_id, owner, submission.future)
    return submission.op_id


def submit_deduplicated(
    state: ServerState,
    registry: DedupeRegistry,
    *,
    owner: str,
    stream: str,
    seq_id: int | None,
    start: Callable[[], concurrent.futures.Future],
    kind: str,
) -> tuple[str, bool]:
    """Start an operation outside any worker (sampling), once per `(stream, seq_id)`.

    Returns (request id, whether it is a repeat); without a seq_id nothing is deduplicated. If
    `start` raises, the claim is released so a corrected retry can run.
    """
    request_id = new_request_id(kind)
    if seq_id is not None:
        earlier = registry.claim(stream, seq_id, request_id)
        if earlier is not None:
            return earlier, True
    try:
        future = start()
    except BaseException:
        if seq_id is not None:
            registry.release(stream, seq_id)
        raise
    state.futures.add(request_id, owner, future)
    return request_id, False


def completed(value: Any) -> concurrent.futures.Future:
    """A future that already holds `value` (for operations answered without queueing)."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(value)
    return future
