"""Learning-rate schedules: a multiplier on the base rate for each optimizer step.

Warmup rises linearly to 1 over `warmup_steps`; after it, `constant` stays at 1, `linear` falls to
0 at `total_steps`, `cosine` follows half a cosine down to 0. Steps count from 0.
"""

from __future__ import annotations

import math
from typing import Literal

from tether.types.errors import UserInputError

LrSchedule = Literal["constant", "linear", "cosine"]


def lr_multiplier(schedule: LrSchedule, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The factor that scales the base learning rate at optimizer step `step` (0-based)."""
    if total_steps < 1:
        raise UserInputError(f"must be >= 1, got {total_steps}", field="total_steps")
    if warmup_steps < 0:
        raise UserInputError(f"must be >= 0, got {warmup_steps}", field="warmup_steps")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise UserInputError(
        f"unknown schedule {schedule!r}; one of constant, linear, cosine", field="lr_schedule"
    )
