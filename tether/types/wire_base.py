"""The base of every JSON wire model, and the one place a body becomes a model or a typed error.

Wire models ignore unknown fields (a newer SDK may add some) and allow `model_`-prefixed field
names (`model_id`, `model_seq_id`). A body that fails validation becomes a `UserInputError` that
names the offending field as a dotted path (`adam_params.beta1`, `prompt.chunks.0.tokens`), so the
server can answer 400 with a useful message without knowing pydantic; `make_wire` does the same
for a body the SDK builds from a caller's values. `ParamsModel` is the base of the wire models that
users also construct by hand (AdamParams, SamplingParams, LoraConfig).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from tether.types.errors import UserInputError

__all__ = [
    "WireModel",
    "parse_wire",
    "dump_wire",
    "make_wire",
    "ParamsModel",
    "MIN_TTL_SECONDS",
    "MAX_TTL_SECONDS",
    "TtlSeconds",
    "NonNegativeInt",
    "Int64",
    "Seed",
    "MAX_INT64",
    "MAX_SEED",
    "MAX_USER_METADATA_BYTES",
    "MAX_DENSE_BYTES",
    "MAX_DENSE_ELEMENTS",
    "MAX_TAGS",
    "UserMetadata",
    "StrUserMetadata",
    "Tags",
]

MIN_TTL_SECONDS = 3600
"""A checkpoint TTL is at least one hour (the hosted service's rule, §5.7)."""
MAX_TTL_SECONDS = 315_576_000
"""... and at most ten years of 365.25 days."""

MAX_INT64 = 2**63 - 1
MAX_SEED = 2**64 - 1
MAX_DENSE_BYTES = 256 << 20
"""Sparse tensors of one request may densify to at most this many bytes in all (unless the server
passes its own bound): a few bytes of CSR cannot claim gigabytes. Dense tensors are bounded by the
body size."""
MAX_DENSE_ELEMENTS = MAX_DENSE_BYTES // 4
"""The same bound in float32 elements."""
MAX_USER_METADATA_BYTES = 16 * 1024
"""`user_metadata` is stored with the session, run or checkpoint: at most this much JSON."""
MAX_TAGS = 64
"""A session keeps at most this many tags, each at most `MAX_TAG_CHARS` characters."""
MAX_TAG_CHARS = 256

# Every integer a client sends is range-checked here, so no value reaches numpy, torch or SQLite
# outside the 64-bit range they store (tests/types/test_wire_bounds.py checks that every int field
# of every wire model uses one of these, or bounds of its own).
TtlSeconds = Annotated[int, Field(ge=MIN_TTL_SECONDS, le=MAX_TTL_SECONDS)]
NonNegativeInt = Annotated[int, Field(ge=0, le=MAX_INT64)]
Int64 = Annotated[int, Field(ge=-MAX_INT64 - 1, le=MAX_INT64)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
"""A random seed: 0 .. 2^64-1."""


def _bounded_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return value
    size = len(json.dumps(value, default=str).encode())
    if size > MAX_USER_METADATA_BYTES:
        raise ValueError(f"is {size} bytes of JSON, more than the {MAX_USER_METADATA_BYTES} allowed")
    return value


def _bounded_tags(value: list[str]) -> list[str]:
    if len(value) > MAX_TAGS:
        raise ValueError(f"has {len(value)} tags, more than the {MAX_TAGS} allowed")
    long = [t for t in value if len(t) > MAX_TAG_CHARS]
    if long:
        raise ValueError(f"tag of {len(long[0])} characters, more than the {MAX_TAG_CHARS} allowed")
    return value


UserMetadata = Annotated[dict[str, Any], AfterValidator(_bounded_metadata)]
"""Free-form JSON metadata kept with a resource, at most `MAX_USER_METADATA_BYTES`."""
StrUserMetadata = Annotated[dict[str, str], AfterValidator(_bounded_metadata)]
Tags = Annotated[list[str], AfterValidator(_bounded_tags)]


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
        raise _user_input_error(exc, model) from exc


def make_wire(model: type[M], /, **fields: Any) -> M:
    """Construct `model` from keyword fields (a body the SDK sends, built from a caller's values).

    Raises UserInputError(field=<dotted path of the first bad field>) on an invalid value, the
    error the server would have answered with, before anything is sent.
    """
    try:
        return model(**fields)
    except ValidationError as exc:
        raise _user_input_error(exc, model) from exc


def _user_input_error(exc: ValidationError, model: type[BaseModel]) -> UserInputError:
    first = exc.errors()[0]
    location = ".".join(str(part) for part in first.get("loc", ())) or None
    return UserInputError(f"{first.get('msg', 'invalid value')} ({model.__name__})", field=location)


class ParamsModel(WireModel):
    """A wire model that users also build in code: AdamParams, SamplingParams, LoraConfig.

    Frozen. Built in code (`AdamParams(learning_rate=...)`) it is strict: an unknown keyword or an
    invalid value raises UserInputError naming the field. Parsed from a body (`parse_wire`,
    `model_validate`, or nested in a request) it ignores unknown fields like every wire model.
    `coerce` also accepts the `tinker` package's object of the same name, or a dict of fields.
    """

    model_config = ConfigDict(frozen=True)

    def __init__(self, **fields: Any) -> None:
        unknown = sorted(set(fields) - set(type(self).model_fields))
        if unknown:
            raise UserInputError(f"unknown field(s) {unknown} ({type(self).__name__})", field=unknown[0])
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            raise _user_input_error(exc, type(self)) from exc

    # Validation (model_validate, nesting in a request) must not run the checks above: pydantic
    # skips an __init__ marked as its own base one (tests/types/test_wire.py guards both paths).
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def coerce(cls, value: Any) -> Any:
        """This type from itself, the `tinker` type of the same name, or a dict (unknown keys dropped).

        Raises UserInputError for anything else or for invalid values.
        """
        if isinstance(value, cls):
            return value
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        if isinstance(value, Mapping):
            return cls(**{k: v for k, v in value.items() if k in cls.model_fields})
        raise UserInputError(f"expected {cls.__name__}, got {type(value).__name__}", field=cls.__name__)


def dump_wire(model: BaseModel) -> dict[str, Any]:
    """The JSON-ready dict of a wire model, None fields omitted (as the Tinker SDK sends them)."""
    return model.model_dump(mode="json", exclude_none=True, by_alias=True)
