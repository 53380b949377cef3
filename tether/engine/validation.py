"""Check a request's datums against the model and the loss before anything runs.

Every check happens before the first forward pass, so a bad request raises a `UserInputError`
naming the datum index and the field and leaves weights, gradients and optimizer state untouched.
The checked datums come back normalised (1-D int64 inputs, int64 targets, float32 loss inputs),
as new objects: the caller's tensors are never modified.

This module knows nothing about models beyond their vocabulary size and context length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from tether.engine.training_types import EngineDatum
from tether.types.errors import UserInputError

FLOAT_INPUTS = ("weights", "logprobs", "advantages", "sequence_ratio_mask", "sampled_mask")
"""Per-token float loss inputs the built-in losses read; each must have the shape of target_tokens."""


def validate_data(
    data: Sequence[EngineDatum],
    *,
    required_inputs: Iterable[str],
    vocab_size: int,
    max_context_length: int,
) -> list[EngineDatum]:
    """Normalised copies of `data`, or `UserInputError` for the first problem found."""
    if not isinstance(data, Sequence) or len(data) == 0:
        raise UserInputError("a request needs at least one datum", field="data")
    required = tuple(required_inputs)
    return [_validate_datum(i, d, required, vocab_size, max_context_length) for i, d in enumerate(data)]


def _validate_datum(
    index: int, datum: EngineDatum, required: tuple[str, ...], vocab_size: int, max_context_length: int
) -> EngineDatum:
    tokens = _as_tensor(datum.input_tokens, index, "model_input")
    if tokens.dim() != 1 or tokens.numel() == 0:
        raise UserInputError(
            f"must be a non-empty 1-D token list, got shape {tuple(tokens.shape)}",
            field="model_input",
            datum_index=index,
        )
    tokens = _as_token_ids(tokens, index, "model_input", vocab_size)
    length = tokens.shape[0]
    if length > max_context_length:
        raise UserInputError(
            f"has {length} tokens, more than the model's context of {max_context_length}",
            field="model_input",
            datum_index=index,
        )
    inputs = datum.loss_fn_inputs if isinstance(datum.loss_fn_inputs, dict) else {}
    for key in required:
        if key not in inputs:
            raise UserInputError(
                "missing, required by this loss", field=f"loss_fn_inputs.{key}", datum_index=index
            )
    checked: dict[str, torch.Tensor] = {}
    if "target_tokens" in inputs:
        field = "loss_fn_inputs.target_tokens"
        targets = _as_tensor(inputs["target_tokens"], index, field)
        if targets.dim() not in (1, 2) or targets.shape[0] != length or targets.numel() == 0:
            raise UserInputError(
                f"shape {tuple(targets.shape)} must be ({length},) or ({length}, K) to match the input length",
                field=field,
                datum_index=index,
            )
        checked["target_tokens"] = _as_token_ids(targets, index, field, vocab_size)
    for key in FLOAT_INPUTS:
        if key not in inputs:
            continue
        field = f"loss_fn_inputs.{key}"
        values = _as_tensor(inputs[key], index, field)
        expected = tuple(checked["target_tokens"].shape) if "target_tokens" in checked else (length,)
        if tuple(values.shape) != expected:
            raise UserInputError(
                f"shape {tuple(values.shape)} must equal target_tokens' shape {expected}",
                field=field,
                datum_index=index,
            )
        if values.dtype == torch.bool or values.is_complex():
            raise UserInputError(f"must be real numbers, got {values.dtype}", field=field, datum_index=index)
        values = values.detach().to(torch.float32)
        if not bool(torch.isfinite(values).all()):
            raise UserInputError("contains NaN or infinite values", field=field, datum_index=index)
        checked[key] = values
    return EngineDatum(input_tokens=tokens, loss_fn_inputs=checked)


def _as_tensor(value: object, index: int, field: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UserInputError(f"not a numeric tensor ({exc})", field=field, datum_index=index) from exc


def _as_token_ids(values: torch.Tensor, index: int, field: str, vocab_size: int) -> torch.Tensor:
    if values.dtype == torch.bool or values.is_floating_point() or values.is_complex():
        raise UserInputError(
            f"token ids must be integers, got {values.dtype}", field=field, datum_index=index
        )
    values = values.detach().to(torch.int64)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise UserInputError(
            f"token id {bad} is outside the vocabulary [0, {vocab_size})", field=field, datum_index=index
        )
    return values
