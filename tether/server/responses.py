"""JSON answers that survive a diverging model: non-finite floats become strings the SDKs parse.

Standard JSON has no NaN or infinity, and the Tinker SDK parses with orjson, which refuses the
`NaN` / `Infinity` tokens Python would write. A metric that diverged is still a result the client
must see, so every float that is not finite is sent as the string `"NaN"`, `"Infinity"` or
`"-Infinity"`, which pydantic (the Tinker SDK's response models) and Python's `float()` (tether's
SDK) both read back as the number.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi.responses import JSONResponse

__all__ = ["FiniteJSONResponse", "finite_json"]


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by its string spelling (containers copied)."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


class FiniteJSONResponse(JSONResponse):
    """A JSONResponse whose non-finite floats are spelled as strings instead of failing to encode."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except ValueError:  # "Out of range float values are not JSON compliant"
            return super().render(finite_json(content))
