"""Types shared by the SDK and the server: wire models, protobuf codecs, errors, `tinker://` paths.

Like `tinker.types`, the package itself offers the SDK's user-facing types (`tether.types.Datum`,
`tether.types.ModelInput`, `tether.types.SamplingParams`, ...: whatever `tether.types.data`
exports). They resolve on first access, so importing a light submodule (`tether.types.errors`,
`tether.types.paths`) never loads numpy or the pydantic models.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

_USER_TYPES = "tether.types.data"


def __getattr__(name: str) -> Any:
    if name == "__all__":
        return list(importlib.import_module(_USER_TYPES).__all__)
    # `from tether.types import errors` asks for the attribute before importing the submodule:
    # answer without loading the user types.
    if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    user_types = importlib.import_module(_USER_TYPES)
    if name not in user_types.__all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(user_types, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *importlib.import_module(_USER_TYPES).__all__})
