"""What gradients are accumulated over, for `optim_step`'s gradient-accumulation normalisation.

Every backward adds the gradients of a raw token-sum loss; `ModelOptimizer.step` may divide their
sum by the loss tokens or the sequences counted here (`tether.types.wire.GradAccNormalization`
documents the modes for users). A datum's loss tokens are its target positions with a non-zero
loss weight: the `weights` input where the loss reads one (cross_entropy), else `advantages` where
it reads those (the policy-gradient losses, whose gradient at a position is zero with a zero
advantage), else every position. Inputs the loss does not read never count. A position with K targets ((N, K) target_tokens) counts once if any of its K
weights is non-zero. For a backward from d loss / d logprobs (the one-pass custom loss) the weight
is that gradient, as in the Tinker SDK's two-pass method (weights = -d loss / d logprobs).

Counts are computed from the request's inputs where they are (the host, for every request the
trainer decodes), so they cost no device work. This module knows nothing about models or optimizers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import get_args

import torch

from tether.types.errors import UserInputError
from tether.types.wire import GradAccMode

__all__ = ["LOSS_WEIGHT_INPUTS", "GradAccMode", "check_mode", "count_loss_tokens", "count_nonzero_positions"]

LOSS_WEIGHT_INPUTS = ("weights", "advantages")
"""The loss input that marks a position as a loss token when non-zero, first present wins."""

_MODES = frozenset(get_args(GradAccMode))


def check_mode(mode: object) -> GradAccMode:
    """`mode` if it is a normalisation mode, else UserInputError naming `grad_accumulation_normalization`."""
    if not isinstance(mode, str) or mode not in _MODES:
        raise UserInputError(
            f"unknown normalization {mode!r}; expected one of {sorted(_MODES)}",
            field="grad_accumulation_normalization",
        )
    return mode  # type: ignore[return-value]


def count_nonzero_positions(values: torch.Tensor) -> torch.Tensor:
    """int64 scalar: positions (rows of the first dimension) where any of `values` is non-zero."""
    if values.dim() <= 1:
        return torch.count_nonzero(values)
    return torch.count_nonzero(values.reshape(values.shape[0], -1).ne(0).any(dim=1))


def count_loss_tokens(
    inputs: Sequence[Mapping[str, torch.Tensor]], loss_inputs: Sequence[str]
) -> torch.Tensor:
    """int64 scalar: the loss tokens of datums with these (validated) loss inputs, on their device.

    `loss_inputs` are the inputs the loss reads (its `required_inputs`).
    """
    key = next((k for k in LOSS_WEIGHT_INPUTS if k in loss_inputs), None)
    total: torch.Tensor | None = None
    for datum in inputs:
        if key is not None:
            count = count_nonzero_positions(datum[key])
        else:
            count = torch.tensor(datum["target_tokens"].shape[0], dtype=torch.int64)
        total = count if total is None else total + count.to(total.device)
    return total if total is not None else torch.zeros((), dtype=torch.int64)
