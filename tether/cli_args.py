"""Command-line options generated from typed config models, so no option is written twice.

Each field of a pydantic config model becomes `--field-name`, with the field's description as its
help text and its default shown. Booleans get `--flag/--no-flag`; lists take several values;
dicts take `KEY=VALUE` pairs. With an `env_prefix`, `PREFIX_FIELD_NAME` in the environment sets a
field's default (the command line still wins).
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from tether.types.errors import ConfigurationError


def _unwrap_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _scalar_type(annotation: Any) -> Any:
    if annotation in (int, float, str):
        return annotation
    if annotation is Path:
        return str
    if typing.get_origin(annotation) is typing.Literal:
        return type(typing.get_args(annotation)[0])
    return str


def add_config_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """Add one option per field of `model` to `parser` (defaults are left unset: see `build_config`)."""
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = _unwrap_optional(field.annotation)
        origin = typing.get_origin(annotation)
        default = field.get_default(call_default_factory=True)
        help_text = (field.description or "").strip()
        if not field.is_required() and default not in (None, "", [], {}):
            shown = default.value if hasattr(default, "value") else default
            help_text += f" (default: {shown})"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif origin in (list, tuple, set):
            (item,) = typing.get_args(annotation)[:1] or (str,)
            parser.add_argument(
                flag, nargs="*", type=_scalar_type(_unwrap_optional(item)), metavar="VALUE", **kwargs
            )
        elif origin in (dict, Mapping):
            parser.add_argument(flag, nargs="*", metavar="KEY=VALUE", **kwargs)
        elif typing.get_origin(annotation) is typing.Literal:
            parser.add_argument(flag, choices=list(typing.get_args(annotation)), **kwargs)
        elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            parser.add_argument(flag, choices=[member.value for member in annotation], **kwargs)
        else:
            parser.add_argument(flag, type=_scalar_type(annotation), **kwargs)


def _parse_pairs(name: str, values: list[str]) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise ConfigurationError(f"expected KEY=VALUE, got {value!r}", field=name)
        pairs[key] = val
    return pairs


def _from_env(model: type[BaseModel], env_prefix: str, environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        raw = environ.get(f"{env_prefix}{name.upper()}")
        if raw is None:
            continue
        annotation = _unwrap_optional(field.annotation)
        origin = typing.get_origin(annotation)
        if origin in (list, tuple, set):
            values[name] = json.loads(raw) if raw.startswith("[") else [v for v in raw.split(",") if v]
        elif origin in (dict, Mapping):
            values[name] = json.loads(raw) if raw.startswith("{") else _parse_pairs(name, raw.split(","))
        elif annotation is bool:
            values[name] = raw.strip().lower() in ("1", "true", "yes", "on")
        else:
            values[name] = raw
    return values


def build_config(
    model: type[BaseModel],
    args: argparse.Namespace,
    *,
    env_prefix: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> BaseModel:
    """The config from (lowest to highest precedence) defaults, environment, command line."""
    values = _from_env(model, env_prefix, os.environ if environ is None else environ) if env_prefix else {}
    for name, field in model.model_fields.items():
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if typing.get_origin(_unwrap_optional(field.annotation)) in (dict, Mapping) and isinstance(
            value, list
        ):
            value = _parse_pairs(name, value)
        values[name] = value
    try:
        return model(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field_name = ".".join(str(p) for p in first["loc"]) or model.__name__
        raise ConfigurationError(f"{first['msg']} (got {first.get('input')!r})", field=field_name) from None
