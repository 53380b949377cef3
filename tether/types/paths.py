"""`tinker://` checkpoint paths and the id formats the Tinker SDK derives on its own.

A checkpoint path is `tinker://<training_run_id>/<segment>/<name>` with exactly three parts
(tinker-protocol.md §5.7); the segment says the kind (`weights` → training state,
`sampler_weights` → sampler weights, `external_weights` → HF export). The SDK builds model ids
itself as `{session_id}:train:{n}` (create-via-load) and uses `{session_id}:sample:{n}` for
sampling sessions, so these formats are part of the wire contract.

Names end up as directory names in checkpoint storage, so they are validated strictly here, once:
no `/`, no `..`, no leading dot, a conservative charset. Every rejection is a `UserInputError`
naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from tether.types.errors import UserInputError

__all__ = [
    "SCHEME",
    "CheckpointKind",
    "SEGMENT_BY_KIND",
    "KIND_BY_SEGMENT",
    "ParsedCheckpointPath",
    "parse_checkpoint_path",
    "format_checkpoint_path",
    "parse_checkpoint_id",
    "validate_checkpoint_name",
    "validate_session_id",
    "format_model_id",
    "parse_model_id",
    "format_sampling_session_id",
    "parse_sampling_session_id",
]

SCHEME = "tinker://"

CheckpointKind = Literal["training", "sampler", "external"]
SEGMENT_BY_KIND: dict[str, str] = {
    "training": "weights",
    "sampler": "sampler_weights",
    "external": "external_weights",
}
KIND_BY_SEGMENT: dict[str, CheckpointKind] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}

MAX_NAME_LENGTH = 200
# A name must not start with "." (hidden files, "..") and uses only filesystem- and URL-safe chars.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=@-]*")
# Session ids go into model ids, URLs and directory names: URL-safe, no ':' (it separates id parts).
_SESSION_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
# Training run ids are model ids, so they may contain ':' as well.
_RUN_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:-]*")


def _check(value: str, pattern: re.Pattern[str], what: str, field: str) -> str:
    """`value` if it fully matches `pattern`, has no '..' and fits MAX_NAME_LENGTH."""
    if not isinstance(value, str) or not value:
        raise UserInputError(f"{what} must be a non-empty string", field=field)
    if len(value) > MAX_NAME_LENGTH:
        raise UserInputError(f"{what} is longer than {MAX_NAME_LENGTH} characters", field=field)
    if ".." in value or not pattern.fullmatch(value):
        raise UserInputError(
            f"{what} {value!r} must match {pattern.pattern} and must not contain '..'",
            field=field,
        )
    return value


def validate_checkpoint_name(name: str, *, field: str = "path") -> str:
    """Return `name` if it is a safe checkpoint name (one path component), else UserInputError."""
    return _check(name, _NAME_RE, "checkpoint name", field)


def validate_session_id(session_id: str, *, field: str = "session_id") -> str:
    """Return `session_id` if it is URL-safe and free of ':' and '/', else UserInputError."""
    return _check(session_id, _SESSION_RE, "session id", field)


@dataclass(frozen=True)
class ParsedCheckpointPath:
    """A parsed `tinker://<training_run_id>/<segment>/<name>`."""

    training_run_id: str
    kind: CheckpointKind
    name: str

    @property
    def segment(self) -> str:
        """The path segment for this kind: `weights`, `sampler_weights` or `external_weights`."""
        return SEGMENT_BY_KIND[self.kind]

    @property
    def checkpoint_id(self) -> str:
        """`<segment>/<name>`, the id the REST routes take (two URL segments)."""
        return f"{self.segment}/{self.name}"

    @property
    def tinker_path(self) -> str:
        """The canonical `tinker://` string."""
        return f"{SCHEME}{self.training_run_id}/{self.checkpoint_id}"

    def __str__(self) -> str:
        return self.tinker_path


def parse_checkpoint_path(path: str, *, field: str = "path") -> ParsedCheckpointPath:
    """Parse and validate a `tinker://` checkpoint path; UserInputError(field=...) if malformed."""
    if not isinstance(path, str) or not path.startswith(SCHEME):
        raise UserInputError(f"checkpoint path must start with {SCHEME!r}, got {path!r}", field=field)
    parts = path[len(SCHEME) :].split("/")
    if len(parts) != 3:
        raise UserInputError(
            f"checkpoint path must be {SCHEME}<training_run_id>/<kind>/<name>, got {path!r}", field=field
        )
    run_id, segment, name = parts
    _check(run_id, _RUN_ID_RE, "training run id", field)
    kind = KIND_BY_SEGMENT.get(segment)
    if kind is None:
        raise UserInputError(
            f"checkpoint kind segment must be one of {sorted(KIND_BY_SEGMENT)}, got {segment!r}", field=field
        )
    validate_checkpoint_name(name, field=field)
    return ParsedCheckpointPath(training_run_id=run_id, kind=kind, name=name)


def format_checkpoint_path(training_run_id: str, kind: CheckpointKind, name: str) -> str:
    """`tinker://<training_run_id>/<segment>/<name>`, validating every part."""
    if kind not in SEGMENT_BY_KIND:
        raise UserInputError(f"unknown checkpoint kind {kind!r}", field="kind")
    _check(training_run_id, _RUN_ID_RE, "training run id", "model_id")
    validate_checkpoint_name(name)
    return ParsedCheckpointPath(training_run_id, kind, name).tinker_path


def parse_checkpoint_id(checkpoint_id: str, *, field: str = "checkpoint_id") -> tuple[CheckpointKind, str]:
    """Split a REST `checkpoint_id` (`weights/<name>`) into (kind, name)."""
    segment, sep, name = (checkpoint_id or "").partition("/")
    kind = KIND_BY_SEGMENT.get(segment)
    if not sep or kind is None:
        raise UserInputError(
            f"checkpoint id must be <kind>/<name> with kind in {sorted(KIND_BY_SEGMENT)}, got {checkpoint_id!r}",
            field=field,
        )
    return kind, validate_checkpoint_name(name, field=field)


def _format_id(session_id: str, role: str, n: int, field: str) -> str:
    validate_session_id(session_id)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserInputError(f"sequence number must be a non-negative int, got {n!r}", field=field)
    return f"{session_id}:{role}:{n}"


def _parse_id(value: str, role: str, field: str) -> tuple[str, int]:
    parts = value.split(":") if isinstance(value, str) else []
    if len(parts) != 3 or parts[1] != role or not parts[2].isdigit() or not _SESSION_RE.fullmatch(parts[0]):
        raise UserInputError(f"expected '<session_id>:{role}:<n>', got {value!r}", field=field)
    return parts[0], int(parts[2])


def format_model_id(session_id: str, model_seq_id: int) -> str:
    """`{session_id}:train:{model_seq_id}`, the model id the SDK also derives by itself."""
    return _format_id(session_id, "train", model_seq_id, "model_seq_id")


def parse_model_id(model_id: str, *, field: str = "model_id") -> tuple[str, int]:
    """(session_id, model_seq_id) from `{session_id}:train:{n}`; UserInputError otherwise."""
    return _parse_id(model_id, "train", field)


def format_sampling_session_id(session_id: str, sampling_session_seq_id: int) -> str:
    """`{session_id}:sample:{n}`."""
    return _format_id(session_id, "sample", sampling_session_seq_id, "sampling_session_seq_id")


def parse_sampling_session_id(
    sampling_session_id: str, *, field: str = "sampling_session_id"
) -> tuple[str, int]:
    """(session_id, n) from `{session_id}:sample:{n}`; UserInputError otherwise."""
    return _parse_id(sampling_session_id, "sample", field)
