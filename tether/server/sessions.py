"""Session lifecycle: ending a session frees its models and samplers; a reaper expires silent ones.

A session ends when its client says so (`finish`) or stops heartbeating for `session_timeout_s`.
Either way its training models are deleted from their trainer (after the operations already
queued for them) and its samplers' weights are unregistered. Checkpoints stay. The same
background loop deletes checkpoints whose TTL has passed and forgets old idempotency keys.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from tether.server.catalogue import CheckpointRow, utcnow
from tether.server.state import ServerState
from tether.types import ops
from tether.types.paths import parse_checkpoint_path

log = logging.getLogger("tether.server")

CREATE_MODEL_SCOPE = "create_model:"
"""Prefix of the idempotency-key scope of model creation; the key is the model id (scope + owner)."""


def end_session(state: ServerState, session_id: str, *, status: str) -> None:
    """Mark the session ended and free everything it holds in memory."""
    state.catalogue.set_session_status(session_id, status)
    state.stability.forget_session(session_id)
    for model in state.live.models_of_session(session_id):
        free_model(state, model.model_id)
    for sampler in state.live.samplers_of_session(session_id):
        free_sampler(state, sampler.sampler_id)


def free_model(state: ServerState, model_id: str) -> None:
    """Delete the model from its trainer after the ops already queued for it."""
    model = state.live.remove_model(model_id)
    if model is None:
        return
    state.dedupe.forget_stream(model_id)
    state.live.forget_ephemeral(model_id)
    trainer = state.trainers.started(model.base_model)
    if trainer is not None:
        trainer.submit(ops.DeleteModel(model_id=model_id), stream=model_id)


def free_sampler(state: ServerState, sampler_id: str) -> None:
    """Unregister a sampler's weights from its trainer (no-op if it is gone)."""
    sampler = state.live.remove_sampler(sampler_id)
    if sampler is None:
        return
    state.dedupe.forget_stream(sampler_id)
    trainer = state.trainers.started(sampler.base_model)
    if sampler.has_weights and trainer is not None:
        trainer.submit(ops.DeleteSampler(sampler_id=sampler_id))


def delete_checkpoint(state: ServerState, row: CheckpointRow) -> None:
    """Delete a checkpoint's files, then its catalogue row."""
    state.checkpoints.delete(row.owner, parse_checkpoint_path(row.tinker_path))
    state.catalogue.delete_checkpoint(row.run_id, row.checkpoint_id)


def expire_sessions(state: ServerState, now: datetime | None = None) -> None:
    """End sessions that stopped heartbeating, freeing their models and samplers."""
    for session_id in state.catalogue.stale_sessions(state.config.session_timeout_s, now=now):
        log.info("session %s stopped heartbeating; freeing its models", session_id)
        end_session(state, session_id, status="expired")


def expire_checkpoints(state: ServerState, now: datetime | None = None) -> None:
    """Delete checkpoints whose TTL has passed.

    `now` (naive UTC) lets tests look into the future instead of sleeping through a TTL.
    """
    for row in state.catalogue.expired_checkpoints(now=now):
        log.info("checkpoint %s expired; deleting it", row.tinker_path)
        delete_checkpoint(state, row)


def expire_idempotency_keys(state: ServerState, now: datetime | None = None) -> int:
    """Forget idempotency keys older than `idempotency_key_ttl_s`; returns how many were forgotten.

    A create-model key is kept while its model lives, so a late retry never creates the model twice.
    `now` (naive UTC) lets tests look into the future.
    """
    cutoff = (now or utcnow()) - timedelta(seconds=state.config.idempotency_key_ttl_s)
    forgotten = 0
    for scope, key in state.catalogue.idempotency_keys_before(cutoff):
        if scope.startswith(CREATE_MODEL_SCOPE) and state.live.has_model(key):
            continue
        state.catalogue.release_idempotency_key(scope, key)
        forgotten += 1
    return forgotten


def expire_once(state: ServerState) -> None:
    """One pass of the reaper: silent sessions, expired checkpoints, old idempotency keys, stale futures."""
    expire_sessions(state)
    expire_checkpoints(state)
    expire_idempotency_keys(state)
    state.futures.sweep()


async def reaper_loop(state: ServerState, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(expire_once, state)
        except Exception:  # noqa: BLE001 - the reaper must survive one bad pass
            log.exception("reaper pass failed")
