"""The one error hierarchy of tether, shared by client and server.

Every error says whose fault it is. The server maps each class to one HTTP status and one
failed-future category in exactly one place (`tether.server.errors`); the SDK turns them back into
the same classes, so `except UserInputError` works on both sides of the wire.
"""

from __future__ import annotations


class TetherError(Exception):
    """Root of every error tether raises on purpose."""

    http_status: int = 500
    category: str = "server"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UserInputError(TetherError):
    """The caller sent something invalid. Names the field and, where there is one, the datum index.

    Raising it must leave all state (weights, gradients, optimizer moments, catalogue) unchanged.
    """

    http_status = 400
    category = "user"

    def __init__(self, message: str, *, field: str | None = None, datum_index: int | None = None) -> None:
        where = []
        if datum_index is not None:
            where.append(f"datum {datum_index}")
        if field is not None:
            where.append(f"field {field!r}")
        full = f"{', '.join(where)}: {message}" if where else message
        super().__init__(full)
        self.field = field
        self.datum_index = datum_index


class AuthenticationError(TetherError):
    """Missing or unknown API key."""

    http_status = 401
    category = "user"


class NotFoundError(TetherError):
    """The named model, session, checkpoint or future does not exist (or belongs to another key)."""

    http_status = 404
    category = "user"


class ConflictError(TetherError):
    """The request conflicts with existing state (a checkpoint name taken without overwrite, ...)."""

    http_status = 409
    category = "user"


class PayloadTooLargeError(TetherError):
    """The request body is larger than the server accepts (HTTP 413; retrying the same body cannot help)."""

    http_status = 413
    category = "user"


class DamagedDataError(TetherError):
    """Stored data (a checkpoint's files or manifest) failed its integrity check: it was damaged or
    edited after it was written. Not the caller's input, but retrying cannot help either (HTTP 422)."""

    http_status = 422
    category = "server"


class OverloadedError(TetherError):
    """The server is at capacity; retry later (HTTP 429, which the Tinker SDK retries)."""

    http_status = 429
    category = "server"


class ConfigurationError(TetherError):
    """An operator setting is invalid. Names the field."""

    http_status = 500
    category = "server"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class ServerError(TetherError):
    """Something went wrong on the server that is not the caller's fault."""

    http_status = 500
    category = "server"


ERRORS_BY_NAME: dict[str, type[TetherError]] = {
    cls.__name__: cls
    for cls in (
        TetherError,
        UserInputError,
        AuthenticationError,
        NotFoundError,
        ConflictError,
        PayloadTooLargeError,
        DamagedDataError,
        OverloadedError,
        ConfigurationError,
        ServerError,
    )
}
