"""The control plane's trainer-job routes, and the reverse proxy to each job's Tinker endpoint.

    POST   /training/v1/trainerJobs                    create (TrainerJobConfig; idempotent per requested id)
    GET    /training/v1/trainerJobs[?show_deleted=true] list the caller's jobs
    GET    /training/v1/trainerJobs/{job_id}           get (tombstones too; ?wait_while_state=&wait_s= holds it)
    DELETE /training/v1/trainerJobs/{job_id}           delete (tombstone; a second delete is a no-op)
    POST   /training/v1/trainerJobs/{job_id}:resume    relaunch a FAILED / CANCELLED / COMPLETED job
    POST   /training/v1/trainerJobs/{job_id}:cancel    stop a live job (CANCELLED)
    GET    /training/v1/trainerJobs/{job_id}/checkpoints          the job's checkpoints (also once it is gone)
    POST   /training/v1/trainerJobs/{job_id}/checkpoints:delete   {"tinker_path"}
    POST   /training/v1/trainerJobs/{job_id}/checkpoints:promote  {"tinker_path", "output_model_id"}: a named model
    POST   /training/v1/trainerJobs/{job_id}/checkpoints:exportMerged  {"tinker_path"}: a merged HF directory
    *      /training/v1/trainerJobs/{job_id}/api/v1/...            forwarded to the job's own server

Another key's job is a 404 everywhere. Forwarding swaps the caller's key for the job's own, counts
as the job's activity, and answers 503 (retryable) while the job is not running or unreachable.
`install(app)` adds the routes and runs the job monitor for the app's lifetime. The job manager (and
`tether.jobs`) is built on first use: by the first job request, or by the monitor once the served base
models are loaded, so a server's start-up does not wait for what its first request does not need.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tether.server.catalogue import as_utc
from tether.server.state import request_owner
from tether.types.errors import UserInputError
from tether.types.wire_jobs import (
    DEFAULT_INACTIVITY_TIMEOUT_S,
    DeleteJobCheckpointRequest,
    ExportedModel,
    ExportMergedRequest,
    JobCheckpointsResponse,
    JobState,
    PromoteCheckpointRequest,
    TrainerJob,
    TrainerJobConfig,
    TrainerJobsResponse,
)

if TYPE_CHECKING:
    from tether.jobs.manager import JobManager
    from tether.jobs.store import TrainerJobRow

log = logging.getLogger("tether.jobs")

router = APIRouter(prefix="/training/v1/trainerJobs")
JOB = "/{job_id}"

PROXY_TIMEOUT_S = 120.0
"""Longer than any long poll (retrieve_future holds a request up to `long_poll_s` <= 40 s)."""
_FORWARDED_REQUEST_HEADERS = ("content-type", "accept", "content-encoding", "accept-encoding", "user-agent")
_FORWARDED_RESPONSE_HEADERS = ("content-type", "content-encoding", "x-should-retry")


_manager_lock = threading.Lock()


def job_manager(app: FastAPI) -> JobManager:
    """The app's job manager, built on first use (thread-safe)."""
    manager = app.state.tether_jobs
    if manager is None:
        with _manager_lock:
            manager = app.state.tether_jobs
            if manager is None:
                from tether.jobs.manager import JobManager

                state = app.state.tether
                manager = app.state.tether_jobs = JobManager(state.catalogue, state.config)
    return manager


def jobs(request: Request) -> JobManager:
    return job_manager(request.app)


def _answer(request: Request, row: TrainerJobRow) -> TrainerJob:
    config = row.job_config
    return TrainerJob(
        job_id=row.job_id,
        name=f"trainerJobs/{row.job_id}",
        state=row.job_state,
        reason=row.reason,
        config=config,
        base_url=f"{str(request.base_url).rstrip('/')}/training/v1/trainerJobs/{row.job_id}",
        direct_url=row.url,
        launcher=row.launcher,
        restart_count=row.restart_count,
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
        last_activity_at=as_utc(row.last_activity_at),
        deleted_at=as_utc(row.deleted_at),
        model_load_s=row.model_load_s,
        inactivity_timeout_s=config.inactivity_timeout or DEFAULT_INACTIVITY_TIMEOUT_S,
    )


@router.post("")
async def create_job(
    body: TrainerJobConfig,
    request: Request,
    trainerJobId: str | None = None,  # noqa: N803
    owner: str = Depends(request_owner),
) -> TrainerJob:
    """`?trainerJobId=` (the reference's query parameter) is the same as `requested_job_id`."""
    if trainerJobId is not None:
        body = TrainerJobConfig.model_validate({**body.model_dump(), "requested_job_id": trainerJobId})
    row = await asyncio.to_thread(jobs(request).create, owner, body)
    return _answer(request, row)


@router.get("")
async def list_jobs(
    request: Request, show_deleted: bool = False, owner: str = Depends(request_owner)
) -> TrainerJobsResponse:
    rows = await asyncio.to_thread(jobs(request).list, owner, include_deleted=show_deleted)
    return TrainerJobsResponse(jobs=[_answer(request, row) for row in rows])


@router.get(JOB)
async def get_job(
    job_id: str,
    request: Request,
    wait_while_state: str | None = None,
    wait_s: float = 0.0,
    owner: str = Depends(request_owner),
) -> TrainerJob:
    """With `?wait_while_state=JOB_STATE_PENDING&wait_s=N` (a tether extension), the answer is held
    until the job leaves that state or N seconds (at most 30) pass: a client waiting for a job sees
    it ready at once instead of on its next poll."""
    if wait_while_state is None or wait_s <= 0:
        return _answer(request, await asyncio.to_thread(jobs(request).get, owner, job_id))
    try:
        state = JobState.parse(wait_while_state)
    except KeyError:
        raise UserInputError(f"unknown job state {wait_while_state!r}", field="wait_while_state") from None
    row = await asyncio.to_thread(jobs(request).wait_for_change, owner, job_id, state, wait_s)
    return _answer(request, row)


@router.delete(JOB)
async def delete_job(job_id: str, request: Request, owner: str = Depends(request_owner)) -> TrainerJob:
    return _answer(request, await asyncio.to_thread(jobs(request).delete, owner, job_id))


@router.post(JOB + ":resume")
async def resume_job(job_id: str, request: Request, owner: str = Depends(request_owner)) -> TrainerJob:
    return _answer(request, await asyncio.to_thread(jobs(request).resume, owner, job_id))


@router.post(JOB + ":cancel")
async def cancel_job(job_id: str, request: Request, owner: str = Depends(request_owner)) -> TrainerJob:
    return _answer(request, await asyncio.to_thread(jobs(request).cancel, owner, job_id))


@router.get(JOB + "/checkpoints")
async def list_job_checkpoints(
    job_id: str, request: Request, owner: str = Depends(request_owner)
) -> JobCheckpointsResponse:
    rows = await asyncio.to_thread(jobs(request).list_checkpoints, owner, job_id)
    return JobCheckpointsResponse(checkpoints=rows)


@router.post(JOB + "/checkpoints:delete")
async def delete_job_checkpoint(
    job_id: str, body: DeleteJobCheckpointRequest, request: Request, owner: str = Depends(request_owner)
) -> dict[str, str]:
    await asyncio.to_thread(jobs(request).delete_checkpoint, owner, job_id, body.tinker_path)
    return {"deleted": body.tinker_path}


@router.post(JOB + "/checkpoints:promote")
async def promote_job_checkpoint(
    job_id: str, body: PromoteCheckpointRequest, request: Request, owner: str = Depends(request_owner)
) -> ExportedModel:
    return await asyncio.to_thread(
        jobs(request).promote_checkpoint, owner, job_id, body.tinker_path, body.output_model_id
    )


@router.post(JOB + "/checkpoints:exportMerged")
async def export_merged_checkpoint(
    job_id: str, body: ExportMergedRequest, request: Request, owner: str = Depends(request_owner)
) -> ExportedModel:
    return await asyncio.to_thread(jobs(request).export_merged, owner, job_id, body.tinker_path)


@router.api_route(JOB + "/api/v1/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
async def forward(job_id: str, path: str, request: Request, owner: str = Depends(request_owner)) -> Response:
    """Forward a Tinker request to the job's own server, with the job's key."""
    manager = jobs(request)
    url, key = await asyncio.to_thread(manager.target, owner, job_id)
    manager.touch(owner, job_id)
    headers = {name: request.headers[name] for name in _FORWARDED_REQUEST_HEADERS if name in request.headers}
    headers["X-API-Key"] = key
    client = _proxy_client(request.app)
    try:
        answer = await client.request(
            request.method,
            f"{url}/api/v1/{path}",
            params=request.query_params,
            content=await request.body(),
            headers=headers,
        )
    except httpx.TransportError as exc:
        return JSONResponse(
            status_code=503,
            content={
                "detail": f"trainer job {job_id!r} is unreachable ({type(exc).__name__}); it may be restarting",
                "category": "server",
            },
        )
    out_headers = {
        name: answer.headers[name] for name in _FORWARDED_RESPONSE_HEADERS if name in answer.headers
    }
    return Response(answer.content, status_code=answer.status_code, headers=out_headers)


def _proxy_client(app: FastAPI) -> httpx.AsyncClient:
    """The forwarding client, made on the first forwarded request (on the event loop, so once):
    building one loads the TLS trust store, which a server that never forwards (every job's own
    process among them) should not pay at start-up."""
    if app.state.tether_jobs_http is None:
        app.state.tether_jobs_http = httpx.AsyncClient(
            timeout=httpx.Timeout(PROXY_TIMEOUT_S, connect=5.0), verify=job_manager(app).tls_context()
        )
    return app.state.tether_jobs_http


def install(app: FastAPI) -> None:
    """Add the job routes to `app` and run the job monitor (and stop the jobs) with the app's lifespan."""
    state = app.state.tether
    app.state.tether_jobs = None  # see `job_manager`
    app.include_router(router)
    inner = app.router.lifespan_context

    async def monitor() -> None:
        await state.trainers.until_warm()  # start-up loads the served models first
        manager = await asyncio.to_thread(job_manager, app)
        if not getattr(app.state, "tether_job_process", False):  # a control plane: ready the first job's path
            await asyncio.to_thread(manager.prewarm)
        while True:  # every poll interval, or at once when the watcher sees a job become ready or end
            await asyncio.to_thread(manager.wait_wake, state.config.job_poll_interval_s)
            try:
                await asyncio.to_thread(manager.tick)
            except Exception:  # noqa: BLE001 - the monitor outlives one bad pass
                log.exception("trainer job monitor pass failed")

    @contextlib.asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[None]:
        async with inner(app_):
            app.state.tether_jobs_http = None
            task = asyncio.create_task(monitor())
            try:
                yield
            finally:
                task.cancel()
                if app.state.tether_jobs_http is not None:
                    await app.state.tether_jobs_http.aclose()
                if app.state.tether_jobs is not None:  # stop the job processes before the catalogue closes
                    await asyncio.to_thread(app.state.tether_jobs.close)

    app.router.lifespan_context = lifespan


__all__ = ["install", "router"]
