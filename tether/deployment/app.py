"""The deployment's HTTP API: health, hot-load, status, token-in/token-out sampling, OpenAI routes.

Routes:

* `GET /healthz` — 200 once the model is loaded.
* `GET /status` — base model, transition type, the identity of the weights served, and `requests`
  (waiting, running sequences, reserved KV tokens; completed, failed, cancelled so far).
* `POST /hot_load` `{"path", "identity"?, "transition"?}` — start loading a chain checkpoint
  directory (202); 409 while another hot-load runs; 401 without the admin token when the process
  has one (`tether serve` gives each deployment it launches a fresh one, `ADMIN_TOKEN_ENV`). `GET /hot_load` — Fireworks-shaped replica
  status (`current_snapshot_identity`, `readiness`, `loading_state{stage, target_snapshot_identity,
  error}`); `/hot_load/v1/models/hot_load` is the same pair under Fireworks' path.
* `POST /v1/sample` — token ids in, token ids and logprobs out (optionally prompt logprobs).
* `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models` — OpenAI-compatible
  (`tether.deployment.openai_routes`).

Every answer naming weights carries `weights_identity` (and the `x-tether-weights-identity`
header). Errors are JSON `{"detail", "error": {"message", "type", "param", "code"}, "category"}` (OpenAI's
error object under `error`) with the error class's status; nothing a client sends yields a 500.

A client that goes away stops its work: the sampling requests of a closed connection are cancelled
in the engine (`run_request` for answers sent whole, `openai_stream.CancellingStream` for streams).
uvicorn (httptools and h11 alike; ASGI spec 2.3) never cancels a handler whose client disconnected:
it marks the request disconnected, drops what the handler sends, and answers `receive()` with
`http.disconnect`. So a whole answer races the engine against `receive()`, and a stream relies on
Starlette's `StreamingResponse`, which under spec 2.3 listens for `http.disconnect` while it
streams and cancels the body when it comes.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, TypeVar
from urllib.parse import quote

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.types import Receive

from tether.deployment.served import ServedWeights, Transition
from tether.engine.sampling import SampleRequest, SampleResult
from tether.types.errors import AuthenticationError, TetherError

IDENTITY_HEADER = "x-tether-weights-identity"
CLIENT_GONE_STATUS = 499
"""Status of the answer nobody receives (the client closed the connection first), as nginx logs it."""
T = TypeVar("T")
_HEADER_SAFE = "/:@-._~!$&'()*+,;="


def identity_header(identity: str) -> str:
    """`identity` as a header value: percent-encoded unless it is plain printable ASCII.

    An identity is any label a hot-load gave (or a checkpoint's path): non-ASCII characters or a
    line break in a header would fail every answer naming it (HTTP headers are latin-1, one line).
    The JSON answers carry the identity as it is.
    """
    if identity.isascii() and identity.isprintable():
        return identity
    return quote(identity, safe=_HEADER_SAFE + " ")


class HotLoadBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    path: str = Field(min_length=1, description="a chain checkpoint directory on this machine")
    identity: str | None = Field(None, min_length=1, max_length=1024)
    transition: Transition | None = None


class SampleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_tokens: list[StrictInt] = Field(min_length=1)
    """Token ids (strict: `true` or `"5"` is not a token id)."""
    num_samples: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop: list[StrictInt] | list[str] | None = None
    include_prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0


def error_body(message: str, category: str, status: int, param: str | None = None) -> dict[str, Any]:
    """`detail` (tether's clients read it) and `error` in OpenAI's shape, so the `openai` package
    shows the cause in its exception's text and `param` names the field."""
    kind = "invalid_request_error" if category == "user" else f"{category}_error"
    return {
        "detail": message,
        "error": {"message": message, "type": kind, "param": param, "code": status},
        "category": category,
    }


def error_response(exc: TetherError) -> JSONResponse:
    param = getattr(exc, "field", None)
    return JSONResponse(
        error_body(exc.message, exc.category, exc.http_status, param), status_code=exc.http_status
    )


class ClientGone(Exception):
    """The HTTP client went away before its answer was ready; its sampling was cancelled."""


async def _disconnect(receive: Receive) -> None:
    """Return once the ASGI server reports the client gone (the request body was already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def results_unless_gone(client: Request, futures: Sequence[Future[T]]) -> list[T]:
    """The results of `futures`, in order, awaited together against one disconnect listener
    (`receive()` is awaited by one task only). If `client` disconnects first (or this handler is
    cancelled) every unfinished future is cancelled (the engine drops those requests and frees what
    they held) and `ClientGone` is raised (`CancelledError` when cancelled); if one fails, the
    others are cancelled (nobody will read them) and its error is raised."""
    results = [asyncio.wrap_future(future) for future in futures]
    gone = asyncio.ensure_future(_disconnect(client.receive))
    pending: set[asyncio.Future[Any]] = set(results)
    try:
        while pending:
            done, _ = await asyncio.wait((*pending, gone), return_when=asyncio.FIRST_COMPLETED)
            if gone in done or any(r.cancelled() or r.exception() is not None for r in done if r is not gone):
                break
            pending -= done
    finally:
        gone.cancel()
        for result in results:
            if not result.done():
                result.cancel()  # cancels its future too (asyncio.wrap_future chains cancellation)
    for result in results:  # the first failure, in order
        error = result.exception() if result.done() and not result.cancelled() else None
        if error is not None:
            raise error
    if any(result.cancelled() for result in results):
        raise ClientGone("the client closed the connection before the answer was ready")
    return [result.result() for result in results]


async def run_request(
    served: ServedWeights, request: SampleRequest, client: Request
) -> tuple[SampleResult, str]:
    """Submit off the event loop (a SYNC switch may hold admission) and await the result; a
    disconnect of `client` cancels the request (`results_unless_gone`)."""
    results, identity = await run_requests(served, [request], client)
    return results[0], identity


async def run_requests(
    served: ServedWeights, requests: list[SampleRequest], client: Request
) -> tuple[list[SampleResult], str]:
    """`run_request` for several requests at once: queued together on one weights version
    (`ServedWeights.submit_many`, so the engine batches them and a hot-load cannot split them),
    awaited together; a disconnect of `client` cancels them all (`results_unless_gone`).
    Returns the results in order and the weights identity."""
    futures, identity = await asyncio.to_thread(served.submit_many, requests)
    return await results_unless_gone(client, futures), identity


def create_app(
    served: ServedWeights, *, model_names: list[str], tokenizer: Any, admin_token: str | None = None
) -> FastAPI:
    """The FastAPI app of one deployment; `model_names` are the names OpenAI requests may use.

    With `admin_token`, `POST /hot_load` (which loads any directory this process can read) requires
    `Authorization: Bearer <admin_token>` and answers 401 otherwise; `tether serve` launches each
    deployment with a fresh random token and is its only holder. Without it (a deployment run by
    hand) hot-loads are open to whoever reaches the port (loopback by default).
    """
    app = FastAPI(title="tether deployment")
    app.state.served = served

    @app.exception_handler(TetherError)
    async def tether_error(_: Request, exc: TetherError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, exc: ClientGone) -> Response:
        return Response(status_code=CLIENT_GONE_STATUS)  # the server drops it: nobody is listening

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
            for e in exc.errors()[:5]
        ]
        message = "invalid request: " + "; ".join(parts)
        first = exc.errors()[0].get("loc", ()) if exc.errors() else ()
        param = ".".join(str(p) for p in first if p != "body") or None
        return JSONResponse(error_body(message, "user", 422, param), status_code=422)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "weights_identity": served.current.identity}

    @app.get("/status")
    async def status() -> dict[str, Any]:
        answer = served.status()
        stats = getattr(served.backend, "stats", None)  # optional on a backend
        if stats is not None:
            answer["requests"] = stats()  # cancelled (client gone) is counted apart from failed
        return answer

    async def post_hot_load(body: HotLoadBody, request: Request) -> JSONResponse:
        if admin_token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), admin_token.encode()):
                raise AuthenticationError(
                    "hot-loads of this deployment need its admin token (Authorization: Bearer ...); "
                    "use the control plane's /api/v1/tether/deployments/{id}/hot_load"
                )
        served.start_hotload(body.path, identity=body.identity, transition=body.transition)
        return JSONResponse(served.status(), status_code=202)

    async def get_hot_load() -> dict[str, Any]:
        return served.status()

    for route in ("/hot_load", "/hot_load/v1/models/hot_load"):
        app.add_api_route(route, post_hot_load, methods=["POST"])
        app.add_api_route(route, get_hot_load, methods=["GET"])

    @app.post("/v1/sample")
    async def sample(body: SampleBody, response: Response, client: Request) -> dict[str, Any]:
        request = SampleRequest(**body.model_dump())
        result, identity = await run_request(served, request, client)
        response.headers[IDENTITY_HEADER] = identity_header(identity)
        return {
            "sequences": [
                {"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": s.stop_reason}
                for s in result.sequences
            ],
            "prompt_logprobs": result.prompt_logprobs,
            "topk_prompt_logprobs": result.topk_prompt_logprobs,
            "weights_identity": identity,
        }

    from tether.deployment.openai_routes import add_openai_routes

    add_openai_routes(app, served, model_names=model_names, tokenizer=tokenizer)
    return app
