"""The one place where errors become HTTP answers.

A `TetherError` raised while handling a request becomes its class's HTTP status with a JSON body
`{"detail", "error", "category"}`; one raised while executing a queued operation becomes the failed
future `{"error", "category"}`; both add `field` and `datum_index` when the error names them. Request validation failures are the caller's fault (422 with the
offending fields), and anything unexpected is logged and reported as a server error, never with an
empty body (the Tinker SDK reads an empty 400 as a dropped connection).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from tether.types.errors import TetherError, UserInputError

log = logging.getLogger("tether.server")


def error_body(exc: BaseException) -> dict[str, object]:
    """The failed-future JSON for an exception raised by an operation (with `field` and `datum_index`
    when the error names them, so a client can rebuild the same error)."""
    if isinstance(exc, TetherError):
        return {"error": exc.message, "category": exc.category, **_where(exc)}
    if isinstance(exc, ValidationError):
        return {"error": _validation_message(exc.errors()), "category": "user"}
    log.exception("operation failed", exc_info=exc)
    return {"error": f"internal error: {type(exc).__name__}: {exc}", "category": "server"}


def _validation_message(errors: list) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


def _where(exc: TetherError) -> dict[str, object]:
    """The field and datum an error names, as JSON keys (absent when it names none)."""
    return {
        attr: getattr(exc, attr) for attr in ("field", "datum_index") if getattr(exc, attr, None) is not None
    }


def error_response(exc: TetherError) -> JSONResponse:
    """The JSON answer for a tether error (for code answering outside a route, like middleware)."""
    return _json_error(exc.http_status, exc.message, exc.category, exc)


def _json_error(status: int, message: str, category: str, exc: TetherError | None = None) -> JSONResponse:
    content: dict[str, object] = {"detail": message, "error": message, "category": category}
    if exc is not None:
        content["error_type"] = type(exc).__name__
        content.update(_where(exc))
    return JSONResponse(
        status_code=status,
        content=content,
        headers={"x-should-retry": "false"}
        if 400 <= status < 500 and status not in (408, 409, 429)
        else None,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Map tether errors, validation errors and surprises to JSON answers."""

    @app.exception_handler(TetherError)
    async def _tether_error(_: Request, exc: TetherError) -> JSONResponse:
        if exc.http_status >= 500:
            log.error("server error: %s", exc.message)
        return _json_error(exc.http_status, exc.message, exc.category, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _json_error(422, _validation_message(list(exc.errors())), "user")

    @app.exception_handler(ValidationError)
    async def _pydantic_error(_: Request, exc: ValidationError) -> JSONResponse:
        return _json_error(422, _validation_message(exc.errors()), "user")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _json_error(500, f"internal error: {type(exc).__name__}", "server")


def require(
    condition: object, message: str, *, field: str | None = None, datum_index: int | None = None
) -> None:
    """Raise `UserInputError` unless `condition` holds (request checks read as one line each)."""
    if not condition:
        raise UserInputError(message, field=field, datum_index=datum_index)
