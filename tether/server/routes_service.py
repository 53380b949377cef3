"""Service routes of the Tinker protocol: client config, sessions, heartbeats, telemetry, futures."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from tether.server.responses import FiniteJSONResponse
from tether.server.sessions import end_session
from tether.server.state import ServerState, request_owner, server_state
from tether.types import wire

router = APIRouter(prefix="/api/v1")


@router.post("/client/config")
async def client_config(state: ServerState = Depends(server_state)) -> dict[str, Any]:
    """Flags for the SDK: plain API-key auth, uncompressed fwd/bwd bodies, optional chunk size."""
    flags: dict[str, Any] = {"pjwt_auth_enabled": False, "proto_compress_fwdbwd": False}
    if state.config.fwdbwd_max_chunk_len is not None:
        flags["fwdbwd_max_chunk_len"] = state.config.fwdbwd_max_chunk_len
    return flags


@router.get("/healthz")
async def healthz(state: ServerState = Depends(server_state)) -> Response:
    """200 once every served base model is loaded and can serve; 503 (with each model's state) before."""
    models = state.trainers.readiness()
    if all(value == "ready" for value in models.values()):
        return JSONResponse({"status": "ok", "models": models})
    return JSONResponse({"status": "loading", "models": models}, status_code=503)


@router.get("/get_server_capabilities")
async def get_server_capabilities(
    state: ServerState = Depends(server_state), _: str = Depends(request_owner)
) -> dict:
    return {
        "supported_models": [
            {"model_name": name, "trainable": True, "sampleable": True}
            for name in state.trainers.served_names
        ]
    }


@router.post("/create_session")
async def create_session(
    body: wire.CreateSessionRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, str]:
    session_id = f"sess-{uuid.uuid4().hex[:16]}"
    state.catalogue.create_session(
        session_id,
        owner,
        tags=body.tags,
        user_metadata=body.user_metadata or {},
        display_name=body.display_name,
        project_id=body.project_id,
    )
    return {"session_id": session_id, "type": "create_session"}


@router.post("/session_heartbeat")
async def session_heartbeat(
    body: wire.SessionHeartbeatRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> JSONResponse:
    """410 once the session is finished, expired or unknown: the SDK stops heartbeating then."""
    if not state.catalogue.heartbeat(body.session_id, owner):
        return JSONResponse(status_code=410, content={"detail": f"session {body.session_id!r} is not active"})
    return JSONResponse({"type": "session_heartbeat"})


@router.post("/sessions/{session_id}/finish")
async def finish_session(
    session_id: str, state: ServerState = Depends(server_state), owner: str = Depends(request_owner)
) -> dict[str, str]:
    state.catalogue.get_session(session_id, owner)
    end_session(state, session_id, status="finished")
    return {"status": "finished"}


@router.post("/telemetry")
async def telemetry(_: str = Depends(request_owner)) -> dict[str, str]:
    """Accepted and discarded: tether does not collect client telemetry."""
    return {"status": "accepted"}


@router.post("/retrieve_future")
async def retrieve_future(
    body: wire.FutureRetrieveRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> Response:
    outcome = await state.futures.wait(body.request_id, owner, state.config.long_poll_s)
    if outcome.payload is None:
        return JSONResponse({"type": "try_again", "request_id": body.request_id, "queue_state": "active"})
    if isinstance(outcome.payload, bytes):
        return Response(outcome.payload, media_type="application/x-protobuf")
    return FiniteJSONResponse(outcome.payload)


@router.post("/cancel_future")
async def cancel_future(
    body: wire.CancelFutureRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, bool]:
    """Cancel an operation that has not started yet, or a running sample (its trainer's engine stops
    it and frees its KV cache, in this process or across the socket of a `tether trainer`); other
    running ops (training) finish and their result is kept."""
    return {"cancelled": state.futures.cancel(body.request_id, owner)}
