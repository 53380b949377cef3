"""REST routes (the SDK's RestClient and the `tinker` CLI): runs, checkpoints, TTLs, sessions.

Everything here reads or edits the catalogue; another key's rows answer 404. A checkpoint id is
`<segment>/<name>` and arrives as two path segments.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from tether.server import sessions
from tether.server.catalogue import CheckpointRow, TrainingRunRow, as_utc, utcnow
from tether.server.state import ServerState, request_owner, server_state
from tether.types import wire
from tether.types.errors import ConflictError, NotFoundError
from tether.types.paths import (
    ParsedCheckpointPath,
    format_model_id,
    parse_checkpoint_id,
    parse_checkpoint_path,
)
from tether.types.wire_base import MAX_INT64

router = APIRouter(prefix="/api/v1")


def checkpoint_json(row: CheckpointRow) -> dict[str, Any]:
    return {
        "checkpoint_id": row.checkpoint_id,
        "checkpoint_type": row.checkpoint_type,
        "time": as_utc(row.created_at).isoformat(),
        "tinker_path": row.tinker_path,
        "size_bytes": row.size_bytes,
        "public": row.public,
        "user_metadata": {str(k): str(v) for k, v in (row.user_metadata or {}).items()},
        "expires_at": as_utc(row.expires_at).isoformat() if row.expires_at else None,
    }


def _run_json(row: TrainingRunRow, latest: dict[tuple[str, str], CheckpointRow]) -> dict[str, Any]:
    """A run as the SDK's TrainingRun; `latest` is `Catalogue.latest_checkpoints` of (at least) this run."""
    training, sampler = latest.get((row.run_id, "training")), latest.get((row.run_id, "sampler"))
    return {
        "training_run_id": row.run_id,
        "base_model": row.base_model,
        "model_owner": row.owner,
        "is_lora": row.is_lora,
        "corrupted": False,
        "lora_rank": row.lora_rank,
        "last_request_time": as_utc(row.last_request_time).isoformat(),
        "last_checkpoint": checkpoint_json(training) if training else None,
        "last_sampler_checkpoint": checkpoint_json(sampler) if sampler else None,
        "user_metadata": {str(k): str(v) for k, v in (row.user_metadata or {}).items()},
    }


@router.get("/training_runs")
async def list_training_runs(
    limit: int = Query(20, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_INT64),
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, Any]:
    rows, total = state.catalogue.list_training_runs(owner, limit, offset)
    latest = state.catalogue.latest_checkpoints(owner, [r.run_id for r in rows])
    return {
        "training_runs": [_run_json(r, latest) for r in rows],
        "cursor": {"offset": offset, "limit": limit, "total_count": total},
    }


@router.get("/training_runs/{run_id}")
async def get_training_run(
    run_id: str, state: ServerState = Depends(server_state), owner: str = Depends(request_owner)
) -> dict[str, Any]:
    row = state.catalogue.get_training_run(run_id, owner)
    return _run_json(row, state.catalogue.latest_checkpoints(owner, [run_id]))


@router.get("/training_runs/{run_id}/checkpoints")
async def list_run_checkpoints(
    run_id: str, state: ServerState = Depends(server_state), owner: str = Depends(request_owner)
) -> dict[str, Any]:
    state.catalogue.get_training_run(run_id, owner)
    rows, total = state.catalogue.list_checkpoints(owner, run_id=run_id)
    return {
        "checkpoints": [checkpoint_json(r) for r in rows],
        "cursor": {"offset": 0, "limit": max(total, 1), "total_count": total},
    }


@router.get("/checkpoints")
async def list_user_checkpoints(
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_INT64),
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, Any]:
    rows, total = state.catalogue.list_checkpoints(owner, limit=limit, offset=offset)
    return {
        "checkpoints": [checkpoint_json(r) for r in rows],
        "cursor": {"offset": offset, "limit": limit, "total_count": total},
    }


def _owned_checkpoint(state: ServerState, owner: str, run_id: str, segment: str, name: str) -> CheckpointRow:
    parse_checkpoint_id(f"{segment}/{name}")
    row = state.catalogue.get_checkpoint(run_id, f"{segment}/{name}", owner)
    if row.owner != owner:  # public checkpoints are readable by all, editable only by their owner
        raise NotFoundError(f"unknown checkpoint {row.tinker_path}")
    return row


@router.delete("/training_runs/{run_id}/checkpoints/{segment}/{name}")
async def delete_checkpoint(
    run_id: str,
    segment: str,
    name: str,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, str]:
    row = _owned_checkpoint(state, owner, run_id, segment, name)
    sessions.delete_checkpoint(state, row)
    return {"status": "deleted"}


@router.post("/training_runs/{run_id}/checkpoints/{segment}/{name}/publish")
async def publish_checkpoint(
    run_id: str,
    segment: str,
    name: str,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, str]:
    row = _owned_checkpoint(state, owner, run_id, segment, name)
    if row.public:
        raise ConflictError(f"{row.tinker_path} is already public")
    state.catalogue.update_checkpoint(row.run_id, row.checkpoint_id, public=True)
    return {"status": "published"}


@router.delete("/training_runs/{run_id}/checkpoints/{segment}/{name}/publish")
async def unpublish_checkpoint(
    run_id: str,
    segment: str,
    name: str,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, str]:
    row = _owned_checkpoint(state, owner, run_id, segment, name)
    state.catalogue.update_checkpoint(row.run_id, row.checkpoint_id, public=False)
    return {"status": "unpublished"}


@router.put("/training_runs/{run_id}/checkpoints/{segment}/{name}/ttl")
async def set_checkpoint_ttl(
    run_id: str,
    segment: str,
    name: str,
    body: wire.SetCheckpointTtlRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, Any]:
    row = _owned_checkpoint(state, owner, run_id, segment, name)
    ttl = body.ttl_seconds
    expires = utcnow() + timedelta(seconds=ttl) if ttl is not None else None
    state.catalogue.update_checkpoint(row.run_id, row.checkpoint_id, expires_at=expires)
    return {"status": "ok", "expires_at": as_utc(expires).isoformat() if expires else None}


@router.get("/training_runs/{run_id}/checkpoints/external_weights/{name}/external_weights_urls")
async def external_weights_urls(
    run_id: str, name: str, state: ServerState = Depends(server_state), owner: str = Depends(request_owner)
) -> dict[str, Any]:
    """file:// URLs: the server and its clients share a filesystem in tether's local deployment."""
    from pathlib import Path

    row = _owned_checkpoint(state, owner, run_id, "external_weights", name)
    root = Path(row.directory)
    urls = {str(f.relative_to(root)): f.resolve().as_uri() for f in sorted(root.rglob("*")) if f.is_file()}
    return {"urls": urls, "expires": as_utc(utcnow() + timedelta(hours=1)).isoformat()}


@router.post("/weights_info")
async def weights_info(
    body: wire.WeightsInfoRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, Any]:
    path = parse_checkpoint_path(body.tinker_path, field="tinker_path")
    row = state.catalogue.get_checkpoint(path.training_run_id, path.checkpoint_id, owner)
    run = state.catalogue.get_training_run(path.training_run_id, row.owner)
    lora = run.lora_config or {}
    return {
        "base_model": run.base_model,
        "is_lora": run.is_lora,
        "optimizer_config": {"type": "adamw"},
        "lora_rank": run.lora_rank,
        "train_unembed": lora.get("train_unembed") if run.is_lora else None,
        "train_mlp": lora.get("train_mlp") if run.is_lora else None,
        "train_attn": lora.get("train_attn") if run.is_lora else None,
    }


@router.get("/sessions")
async def list_sessions(
    limit: int = Query(20, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_INT64),
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict:
    return {"sessions": [s.session_id for s in state.catalogue.list_sessions(owner, limit, offset)]}


@router.get("/sessions/{session_id}")
async def get_session(
    session_id: str, state: ServerState = Depends(server_state), owner: str = Depends(request_owner)
) -> dict[str, Any]:
    row = state.catalogue.get_session(session_id, owner)
    return {
        "training_run_ids": state.catalogue.runs_of_session(session_id),
        "sampler_ids": state.catalogue.samplers_of_session(session_id),
        "user_metadata": {str(k): str(v) for k, v in (row.user_metadata or {}).items()},
        "display_name": row.display_name,
    }


COPY_PENDING = f"pending:{uuid.uuid4().hex}"
"""The durable value of a copy in progress in this process (a claim naming another process is orphaned:
one server process serves a data directory, so the process that made it is gone)."""
COPY_WAIT_S = 30.0
"""How long a retry waits for a concurrent copy with its key before answering 409 (the SDK retries)."""
_COPY_POLL_S = 0.05


async def _claim_copy(state: ServerState, scope: str, key: str) -> str | None:
    """Claim the copy under `key` for this request (None), or the tinker path of the copy another request
    with the same key made, waiting while it is in progress; ConflictError if it is still running after
    COPY_WAIT_S."""
    deadline = asyncio.get_running_loop().time() + COPY_WAIT_S
    while True:
        earlier = state.catalogue.claim_idempotency_key(scope, key, COPY_PENDING)
        if earlier is None:
            return None
        while earlier == COPY_PENDING:
            if asyncio.get_running_loop().time() > deadline:
                raise ConflictError(
                    f"a copy with X-Idempotency-Key {key!r} is still in progress; retry later"
                )
            await asyncio.sleep(_COPY_POLL_S)
            earlier = state.catalogue.idempotency_value(scope, key)
        if earlier is None:
            continue  # the other attempt failed and released the key: claim it again
        if not earlier.startswith("pending:"):
            return earlier
        if state.catalogue.replace_idempotency_value(scope, key, earlier, COPY_PENDING):
            return None  # took over a claim orphaned by an earlier server process


@router.post("/copy_weights")
async def copy_weights(
    body: wire.CopyWeightsRequest,
    request: Request,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, str]:
    """Copy a checkpoint into a new training run of a new session. Retries with the same
    X-Idempotency-Key, concurrent or later (even after a restart), get the first copy's tinker path:
    the key is claimed durably in the catalogue (scope `copy:<owner>`) before anything is copied."""
    source = parse_checkpoint_path(body.source_path, field="source_path")
    row = state.catalogue.get_checkpoint(source.training_run_id, source.checkpoint_id, owner)
    source_run = state.catalogue.get_training_run(source.training_run_id, row.owner)
    scope, key = f"copy:{owner}", request.headers.get("x-idempotency-key")
    if key:
        earlier = await _claim_copy(state, scope, key)
        if earlier is not None:
            return {"tinker_path": earlier}
    try:
        destination = await _copy(state, body, owner, source, row, source_run)
    except BaseException:
        if key:
            state.catalogue.release_idempotency_key(scope, key)
        raise
    if key:
        state.catalogue.set_idempotency_value(scope, key, destination.tinker_path)
    return {"tinker_path": destination.tinker_path}


async def _copy(
    state: ServerState,
    body: wire.CopyWeightsRequest,
    owner: str,
    source: ParsedCheckpointPath,
    row: CheckpointRow,
    source_run: TrainingRunRow,
) -> ParsedCheckpointPath:
    session_id = body.session_id or f"sess-{uuid.uuid4().hex[:16]}"
    if body.session_id is None:
        state.catalogue.create_session(
            session_id,
            owner,
            tags=["copy"],
            user_metadata={},
            display_name=None,
            project_id=body.destination_project_id,
        )
        state.catalogue.set_session_status(session_id, "finished")
    else:
        state.catalogue.get_session(session_id, owner)
    run_id = format_model_id(session_id, body.model_seq_id or 0)
    destination = ParsedCheckpointPath(run_id, source.kind, source.name)
    info = await asyncio.to_thread(state.checkpoints.copy, row.owner, source, owner, destination)
    state.catalogue.add_training_run(
        run_id,
        session_id,
        owner,
        base_model=source_run.base_model,
        is_lora=source_run.is_lora,
        lora_rank=source_run.lora_rank,
        lora_config=dict(source_run.lora_config or {}),
        user_metadata={},
    )
    state.catalogue.add_checkpoint(
        run_id,
        destination.checkpoint_id,
        owner,
        checkpoint_type=destination.kind,
        directory=str(state.checkpoints.directory(owner, destination)),
        size_bytes=info.size_bytes,
        ttl_seconds=body.ttl_seconds,
        user_metadata=dict(row.user_metadata or {}),
    )
    return destination


@router.put("/sessions/{session_id}/project")
async def assign_session_project(
    session_id: str,
    body: wire.AssignSessionProjectRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, str]:
    state.catalogue.get_session(session_id, owner)
    state.catalogue.set_session_project(session_id, body.project_id)
    return {"status": "ok"}


@router.get("/sessions/{session_id}/trace_export")
async def export_session_trace(
    session_id: str, state: ServerState = Depends(server_state), owner: str = Depends(request_owner)
) -> dict[str, str]:
    """tether records no request traces; answering `failed` ends the SDK's polling at once."""
    state.catalogue.get_session(session_id, owner)
    return {"status": "failed", "error": "tether does not record session traces"}
