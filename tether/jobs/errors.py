"""Errors of the trainer-job control plane (HTTP statuses through `tether.types.errors`)."""

from __future__ import annotations

from tether.types.errors import ConflictError, ServerError


class JobConflictError(ConflictError):
    """409 naming the field that conflicts (a reused or tombstoned id, a deleted job)."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(f"field {field!r}: {message}")
        self.field = field


class JobNotRunningError(ServerError):
    """The job exists but does not serve right now (503: retry, or reconnect and wait)."""

    http_status = 503
