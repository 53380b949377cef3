"""The base of every JSON wire model, and the one place a body becomes a model or a typed error.

Wire models ignore unknown fields (a newer SDK may add some) and allow `model_`-prefixed field
names (`model_id`, `model_seq_id`). A body that fails validation becomes a `UserInputError` that
names the offending field as a dotted path (`adam_params.beta1`, `prompt.chunks.0.tokens`), so the
server can answer 400 with a useful message without knowing pydantic.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tether.types.errors import UserInputError

__all__ = [
    "WireModel",
    "parse_wire",
    "dump_wire",
    "MIN_TTL_SECONDS",
    "MAX_TTL_SECONDS",
    "TtlSeconds",
    "NonNegativeInt",
]

MIN_TTL_SECONDS = 3600
"""A checkpoint TTL is at least one hour (the hosted service's rule, §5.7)."""
MAX_TTL_SECONDS = 315_576_000
"""... and at most ten years of 365.25 days."""

TtlSeconds = Annotated[int, Field(ge=MIN_TTL_SECONDS, le=MAX_TTL_SECONDS)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class WireModel(BaseModel):
    """A JSON body of the Tinker protocol or tether's extensions."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=(), populate_by_name=True)


M = TypeVar("M", bound=BaseModel)


def parse_wire(model: type[M], body: bytes | str | dict[str, Any] | None) -> M:
    """Validate a request body (raw JSON or an already-parsed dict) into `model`.

    Raises UserInputError(field=<dotted path of the first bad field>) on invalid input.
    """
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body or b"{}")
        except json.JSONDecodeError as exc:
            raise UserInputError(f"body is not valid JSON: {exc}", field="body") from exc
    if not isinstance(body, dict):
        raise UserInputError(f"body must be a JSON object, got {type(body).__name__}", field="body")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(str(part) for part in first.get("loc", ())) or None
        raise UserInputError(
            f"{first.get('msg', 'invalid value')} ({model.__name__})", field=location
        ) from exc


def dump_wire(model: BaseModel) -> dict[str, Any]:
    """The JSON-ready dict of a wire model, None fields omitted (as the Tinker SDK sends them)."""
    return model.model_dump(mode="json", exclude_none=True, by_alias=True)
