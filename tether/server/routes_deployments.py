"""Deployments as a REST resource of `tether serve`, and the hot-load / inference proxy to them.

    POST   /api/v1/tether/deployments                      create (409 if the id is taken)
    GET    /api/v1/tether/deployments                      list the caller's
    GET    /api/v1/tether/deployments/{id}                 state + identity of the weights served
    DELETE /api/v1/tether/deployments/{id}                 stop and forget
    POST   /api/v1/tether/deployments/{id}/restart         start its process again (last good weights)
    POST   /api/v1/tether/deployments/{id}/hot_load        {"identity", "path"?, "incremental_snapshot_metadata"?, "transition"?}
    GET    /api/v1/tether/deployments/{id}/hot_load        Fireworks-shaped replica status
    *      /api/v1/tether/deployments/{id}/v1/...          proxied to the deployment (completions, chat, sample, models)

Only those four routes are proxied: anything else under `v1/` (`v1/%2e%2e/hot_load` included, which
would reach the deployment's unchecked `/hot_load`) is a 404. A serving process that does not
answer (it died) makes the deployment FAILED with the cause, and the request a 409 naming it; a
stream cut short by its death ends with an `error` event and `[DONE]`. Stopping a process (delete,
restart) runs off the event loop, so it never holds up other requests.

A client that goes away mid-request closes the proxy's connection to the deployment, which
cancels the sampling there (`tether.deployment.app`): a streamed answer's relay is cancelled by
Starlette on `http.disconnect` and closes its upstream response; an answer sent whole races the
deployment's reply against `receive()` (uvicorn never cancels a handler whose client left).

A hot-load names a sampler checkpoint by its `tinker://` path (the `path` returned by
save_weights_for_sampler); the checkpoint must be the caller's. Another key's deployment answers
404. The registry is built on first use, so a server that never sees a deployment starts no
process and imports nothing of `tether.deployment`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from tether.server.deployments import DeploymentRegistry, deployment_info
from tether.server.state import ServerState, request_owner, server_state
from tether.types.errors import ConflictError, NotFoundError, ServerError, UserInputError
from tether.types.paths import parse_checkpoint_path

router = APIRouter(prefix="/api/v1/tether/deployments")
_lock = threading.Lock()
_PROXY_TIMEOUT_S = 600.0
PROXIED = frozenset({"completions", "chat/completions", "models", "sample"})
"""The deployment routes a client may reach through the proxy (under the deployment's `/v1/`)."""


class CreateDeployment(BaseModel):
    model_config = ConfigDict(extra="allow")
    deployment_id: str
    base_model: str
    hot_load_transition_type: str = "ASYNC"
    description: str | None = None
    hot_load_trainer_job: str | None = None
    min_replica_count: int = Field(0, ge=0, le=1)
    max_replica_count: int = Field(1, ge=0, le=1)


class HotLoad(BaseModel):
    model_config = ConfigDict(extra="ignore")
    identity: str = Field(min_length=1, max_length=1024)
    path: str | None = None
    incremental_snapshot_metadata: dict[str, Any] | None = None
    reset_prompt_cache: bool = True
    transition: str | None = None


def install(app: FastAPI) -> None:
    app.include_router(router)


def close(app: FastAPI) -> None:
    """Stop every deployment process (server shutdown); rows stay, so a restart starts them again."""
    registry = getattr(app.state, "deployments", None)
    if registry is not None:
        registry.close()


def registry(request: Request, state: ServerState = Depends(server_state)) -> DeploymentRegistry:
    app = request.app
    with _lock:
        found = getattr(app.state, "deployments", None)
        if found is None:
            config = state.config
            paths = {name: config.model_aliases.get(name, name) for name in config.models}
            found = app.state.deployments = DeploymentRegistry(
                state.catalogue, config.data_dir, model_paths=paths, torch_threads=config.torch_threads
            )
    return found


async def _gone(
    reg: DeploymentRegistry | None, deployment_id: str, owner: str, exc: Exception
) -> ConflictError | ServerError:
    """The error for a serving process that did not answer: a 409 naming the state it is in now
    (FAILED, with the cause, when it died), else a ServerError."""
    if reg is not None:
        row = await asyncio.to_thread(reg.did_not_answer, deployment_id, owner)
        if row.state != "READY":
            return ConflictError(
                f"deployment {deployment_id!r} is {row.state}, not READY"
                + (f": {row.error}" if row.error else "")
            )
    return ServerError(f"the deployment's serving process did not answer: {exc}")


async def _child(
    client_url: str,
    method: str,
    path: str,
    *,
    reg: DeploymentRegistry | None = None,
    deployment_id: str = "",
    owner: str = "",
    **kw: Any,
) -> httpx.Response:
    async with httpx.AsyncClient(timeout=_PROXY_TIMEOUT_S) as client:
        try:
            return await client.request(method, f"{client_url}{path}", **kw)
        except httpx.HTTPError as exc:
            raise await _gone(reg, deployment_id, owner, exc) from exc


async def _status(reg: DeploymentRegistry, deployment_id: str, owner: str) -> dict[str, Any] | None:
    try:
        url = reg.url(deployment_id, owner)
        answer = await _child(url, "GET", "/status", reg=reg, deployment_id=deployment_id, owner=owner)
    except ConflictError:  # not READY, or it died just now (then the row says FAILED and why)
        return None
    try:
        return answer.json() if answer.status_code == 200 else None
    except ValueError:  # not JSON: whatever answers there is not a tether deployment
        return None


@router.post("")
async def create(
    body: CreateDeployment,
    request: Request,
    owner: str = Depends(request_owner),
    reg: DeploymentRegistry = Depends(registry),
) -> dict[str, Any]:
    if body.hot_load_trainer_job is not None:
        from tether.server.routes_jobs import jobs

        try:
            await asyncio.to_thread(jobs(request).get, owner, body.hot_load_trainer_job)
        except (NotFoundError, UserInputError) as exc:
            raise UserInputError(
                f"no trainer job {body.hot_load_trainer_job!r} of this key: {exc}",
                field="hot_load_trainer_job",
            ) from exc
    row = await asyncio.to_thread(
        reg.create,
        owner,
        body.deployment_id,
        body.base_model,
        transition=body.hot_load_transition_type,
        config=body.model_dump(exclude_none=True),
    )
    return deployment_info(row)


@router.get("")
async def list_deployments(
    owner: str = Depends(request_owner), reg: DeploymentRegistry = Depends(registry)
) -> dict[str, Any]:
    rows = reg.list(owner)
    # each READY one's weights identity, as `get` shows it (without it every list said null)
    statuses = await asyncio.gather(
        *(_status(reg, row.deployment_id, owner) if row.state == "READY" else _none() for row in rows)
    )
    return {"deployments": [deployment_info(row, status) for row, status in zip(rows, statuses, strict=True)]}


async def _none() -> None:
    return None


@router.get("/{deployment_id}")
async def get(
    deployment_id: str, owner: str = Depends(request_owner), reg: DeploymentRegistry = Depends(registry)
) -> dict[str, Any]:
    row = reg.get(deployment_id, owner)
    status = await _status(reg, deployment_id, owner)
    if status is None and row.state == "READY":  # it did not answer: the row says why now
        row = reg.get(deployment_id, owner)
    return deployment_info(row, status)


@router.delete("/{deployment_id}")
async def delete(
    deployment_id: str, owner: str = Depends(request_owner), reg: DeploymentRegistry = Depends(registry)
) -> dict[str, Any]:
    await asyncio.to_thread(reg.delete, deployment_id, owner)  # stopping the process may take seconds
    return {"deployment_id": deployment_id, "state": "DELETED"}


@router.post("/{deployment_id}/restart")
async def restart(
    deployment_id: str, owner: str = Depends(request_owner), reg: DeploymentRegistry = Depends(registry)
) -> dict[str, Any]:
    return deployment_info(await asyncio.to_thread(reg.restart, deployment_id, owner))


@router.post("/{deployment_id}/hot_load")
async def hot_load(
    deployment_id: str,
    body: HotLoad,
    request: Request,
    owner: str = Depends(request_owner),
    reg: DeploymentRegistry = Depends(registry),
    state: ServerState = Depends(server_state),
) -> JSONResponse:
    url = reg.url(deployment_id, owner)
    target = body.path or body.identity
    try:
        parsed = parse_checkpoint_path(target)
    except (UserInputError, ValueError) as exc:
        raise UserInputError(f"{target!r} is not a tinker:// sampler checkpoint path", field="path") from exc
    if parsed.kind != "sampler":
        raise UserInputError(f"{target} is not a sampler_weights/ checkpoint", field="path")
    directory = state.checkpoints.directory(owner, parsed)
    if not (directory / "manifest.json").is_file():
        directory = await _trainer_job_checkpoint(request, reg, deployment_id, owner, target)
    previous = (body.incremental_snapshot_metadata or {}).get("previous_snapshot_identity")
    if previous is not None:
        await _check_previous_snapshot(reg, deployment_id, owner, target, directory, previous)
    answer = await _child(
        url,
        "POST",
        "/hot_load",
        reg=reg,
        deployment_id=deployment_id,
        owner=owner,
        json={"path": str(directory), "identity": body.identity, "transition": body.transition},
        headers=reg.admin_headers(deployment_id),
    )
    try:
        content = answer.json()
    except ValueError:  # not JSON: not a tether deployment answering
        raise ServerError(
            f"deployment {deployment_id} answered its hot-load with HTTP {answer.status_code} and a body "
            "that is not JSON"
        ) from None
    return JSONResponse(content, status_code=answer.status_code)


async def _trainer_job_checkpoint(
    request: Request, reg: DeploymentRegistry, deployment_id: str, owner: str, target: str
) -> Path:
    """A checkpoint that is not the control plane's own: a trainer job's sampler checkpoint `target`
    (a dedicated trainer job writes into its own data directory), from the deployment's
    `hot_load_trainer_job` when it names one, else from any of the caller's jobs. NotFoundError if
    there is no such checkpoint."""
    from tether.server.routes_jobs import jobs

    job_id = reg.get(deployment_id, owner).config.get("hot_load_trainer_job")
    directory = await asyncio.to_thread(
        jobs(request).sampler_directory, owner, target, str(job_id) if job_id else None
    )
    if not (directory / "manifest.json").is_file():
        raise NotFoundError(f"checkpoint {target} has no files")
    return directory


async def _check_previous_snapshot(
    reg: DeploymentRegistry, deployment_id: str, owner: str, target: str, directory: Path, previous: Any
) -> None:
    """Fireworks' delta contract: `incremental_snapshot_metadata.previous_snapshot_identity` says the
    checkpoint is a delta on that snapshot, which the deployment must be serving. UserInputError if
    the checkpoint is not a delta or applies to another snapshot; ConflictError if the deployment
    serves something else (its next load must then be a base)."""
    from tether.storage.sampler_chain import read_chain_link  # torch: not at app construction

    field = "incremental_snapshot_metadata.previous_snapshot_identity"
    if not isinstance(previous, str):
        raise UserInputError(f"must be a tinker:// path string, got {previous!r}", field=field)
    link = await asyncio.to_thread(read_chain_link, directory)
    if link.checkpoint_type != "delta":
        raise UserInputError(
            f"{target} is a {link.checkpoint_type} checkpoint; only a delta has a previous snapshot "
            "(send a base without incremental_snapshot_metadata)",
            field=field,
        )
    if link.parent_identity != previous:
        raise UserInputError(f"{target} is a delta on {link.parent_identity}, not on {previous}", field=field)
    status = await _status(reg, deployment_id, owner)
    replicas = (status or {}).get("replicas") or [{}]
    serving = replicas[0].get("current_snapshot_identity")
    if serving != previous:
        raise ConflictError(
            f"deployment {deployment_id} serves {serving or 'nothing yet'}, not {previous}, which the delta "
            f"{target} applies to: hot-load a base (or that snapshot) first"
        )


@router.get("/{deployment_id}/hot_load")
async def hot_load_status(
    deployment_id: str, owner: str = Depends(request_owner), reg: DeploymentRegistry = Depends(registry)
) -> dict[str, Any]:
    row = reg.get(deployment_id, owner)
    status = await _status(reg, deployment_id, owner)
    if status is None:  # not serving: say why (a hot-load waiter stops on FAILED)
        row = reg.get(deployment_id, owner)
        return {"replicas": [], "state": row.state, "error": row.error}
    return {**status, "state": row.state}


async def _disconnect(request: Request) -> None:
    """Return once the client of `request` is gone (its body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.api_route("/{deployment_id}/v1/{rest:path}", methods=["GET", "POST"])
async def proxy(
    deployment_id: str,
    rest: str,
    request: Request,
    owner: str = Depends(request_owner),
    reg: DeploymentRegistry = Depends(registry),
) -> Response:
    if rest not in PROXIED:
        raise NotFoundError(f"no route v1/{rest} on a deployment; it serves v1/ {sorted(PROXIED)}")
    url = reg.url(deployment_id, owner)
    body = await request.body()
    headers = {"content-type": request.headers.get("content-type", "application/json")}
    target = f"{url}/v1/{rest}"
    try:
        streaming = request.method == "POST" and json.loads(body or b"{}").get("stream") is True
    except (ValueError, AttributeError):
        streaming = False  # the deployment answers the malformed body with its own 4xx
    if streaming:
        client = httpx.AsyncClient(timeout=_PROXY_TIMEOUT_S)
        try:
            upstream = await client.send(
                client.build_request("POST", target, content=body, headers=headers), stream=True
            )
        except httpx.HTTPError as exc:
            await client.aclose()
            raise await _gone(reg, deployment_id, owner, exc) from exc

        async def close_upstream() -> None:  # closing the connection cancels the deployment's sampling
            await upstream.aclose()
            await client.aclose()

        async def died() -> None:
            await asyncio.to_thread(reg.did_not_answer, deployment_id, owner)

        return StreamingResponse(
            relay_stream(upstream, client, died),
            status_code=upstream.status_code,
            media_type=upstream.headers.get("content-type"),
            background=BackgroundTask(close_upstream),  # also when the client left before the relay began
        )
    call = asyncio.ensure_future(
        _child(
            url,
            request.method,
            f"/v1/{rest}",
            reg=reg,
            deployment_id=deployment_id,
            owner=owner,
            content=body or None,
            headers=headers,
        )
    )
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((call, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not call.done():
            call.cancel()  # httpx closes the connection: the deployment cancels the sampling
    if call.cancelled():
        return Response(status_code=499)  # nobody receives it: the client left first
    answer = call.result()
    keep = {
        k: v for k, v in answer.headers.items() if k.lower() in ("content-type", "x-tether-weights-identity")
    }
    return Response(answer.content, status_code=answer.status_code, headers=keep)


async def relay_stream(
    upstream: httpx.Response, client: httpx.AsyncClient, died: Callable[[], Awaitable[None]] | None = None
) -> AsyncIterator[bytes]:
    """The deployment's event stream as it comes; if the serving process dies half way, `died()`
    records it (the deployment is FAILED before the client hears of it), then an `error` event and
    `[DONE]` end the stream (an OpenAI client raises with the cause instead of hanging)."""
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        if died is not None:
            await died()
        message = f"the deployment's serving process stopped answering during the stream: {exc}"
        error = {"message": message, "type": "server_error", "param": None, "code": 503}
        yield f"\n\ndata: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n".encode()
    finally:
        await upstream.aclose()
        await client.aclose()
