"""The deployment's HTTP API: health, hot-load, status, token-in/token-out sampling, OpenAI routes.

Routes:

* `GET /healthz` — 200 once the model is loaded.
* `GET /status` — base model, transition type and the identity of the weights served.
* `POST /hot_load` `{"path", "identity"?, "transition"?}` — start loading a chain checkpoint
  directory (202); 409 while another hot-load runs. `GET /hot_load` — Fireworks-shaped replica
  status (`current_snapshot_identity`, `readiness`, `loading_state{stage, target_snapshot_identity,
  error}`); `/hot_load/v1/models/hot_load` is the same pair under Fireworks' path.
* `POST /v1/sample` — token ids in, token ids and logprobs out (optionally prompt logprobs).
* `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models` — OpenAI-compatible
  (`tether.deployment.openai_routes`).

Every answer naming weights carries `weights_identity` (and the `x-tether-weights-identity`
header). Errors are JSON `{"detail", "error": {"message", "type", "param", "code"}, "category"}` (OpenAI's
error object under `error`) with the error class's status; nothing a client sends yields a 500.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from tether.deployment.served import ServedWeights, Transition
from tether.engine.sampling import SampleRequest, SampleResult
from tether.types.errors import TetherError

IDENTITY_HEADER = "x-tether-weights-identity"
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


async def run_request(served: ServedWeights, request: SampleRequest) -> tuple[SampleResult, str]:
    """Submit off the event loop (a SYNC switch may hold admission) and await the result."""
    future, identity = await asyncio.to_thread(served.submit, request)
    return await asyncio.wrap_future(future), identity


def create_app(served: ServedWeights, *, model_names: list[str], tokenizer: Any) -> FastAPI:
    """The FastAPI app of one deployment; `model_names` are the names OpenAI requests may use."""
    app = FastAPI(title="tether deployment")
    app.state.served = served

    @app.exception_handler(TetherError)
    async def tether_error(_: Request, exc: TetherError) -> JSONResponse:
        return error_response(exc)

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
        return served.status()

    async def post_hot_load(body: HotLoadBody) -> JSONResponse:
        served.start_hotload(body.path, identity=body.identity, transition=body.transition)
        return JSONResponse(served.status(), status_code=202)

    async def get_hot_load() -> dict[str, Any]:
        return served.status()

    for route in ("/hot_load", "/hot_load/v1/models/hot_load"):
        app.add_api_route(route, post_hot_load, methods=["POST"])
        app.add_api_route(route, get_hot_load, methods=["GET"])

    @app.post("/v1/sample")
    async def sample(body: SampleBody, response: Response) -> dict[str, Any]:
        request = SampleRequest(**body.model_dump())
        result, identity = await run_request(served, request)
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
