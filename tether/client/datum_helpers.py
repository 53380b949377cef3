"""Build training datums from token sequences, with the tinker-cookbook's exact semantics.

`datum_from_model_input_weights` turns a rendered example (tokens plus a loss weight per token) into
a next-token-prediction Datum: truncate, shift by one, align the weights with the targets, and
optionally normalise them per example. Recipes written for the cookbook get identical datums.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from tether.types.data import Datum, EncodedTextChunk, ModelInput, TensorData
from tether.types.errors import UserInputError

Reduction = Literal["none", "mean"]


def truncate_model_input(model_input: ModelInput, max_length: int) -> ModelInput:
    """Keep the first `max_length` tokens (text chunks are cut partially, empty ones dropped)."""
    kept: list[EncodedTextChunk] = []
    remaining = max_length
    for chunk in model_input.chunks:
        if remaining <= 0:
            break
        tokens = chunk.tokens[:remaining]
        remaining -= len(tokens)
        if tokens:
            kept.append(EncodedTextChunk(tokens=tokens))
    return ModelInput(chunks=kept)


def datum_from_model_input_weights(
    model_input: ModelInput,
    weights: Sequence[float] | np.ndarray,
    max_length: int | None = None,
    reduction: Reduction = "mean",
) -> Datum:
    """A next-token Datum from `model_input` (N tokens) and `weights` (one per token).

    The input is tokens[:-1], the targets tokens[1:], and the weight of predicting token i+1 is
    weights[i+1]. With `max_length`, the sequence is cut to its first `max_length` tokens first (so
    a completion past the limit can vanish, leaving all-zero weights, as in the cookbook).
    `reduction="mean"` scales the weights to sum to 1 (unless they sum to 0); `"none"` keeps them.
    """
    model_input = ModelInput.coerce(model_input)
    weights_N = np.asarray(weights, dtype=np.float32).reshape(-1)
    if weights_N.shape[0] != model_input.length:
        raise UserInputError(
            f"has {weights_N.shape[0]} values but model_input has {model_input.length} tokens",
            field="weights",
        )
    if reduction not in ("none", "mean"):
        raise UserInputError(f"must be 'none' or 'mean', got {reduction!r}", field="reduction")
    if max_length is not None:
        model_input = truncate_model_input(model_input, max_length)
    else:
        model_input = ModelInput(chunks=[c for c in model_input.chunks if c.tokens])
    tokens = model_input.to_ints()
    if len(tokens) < 2:
        raise UserInputError("needs at least 2 tokens after truncation to form a target", field="model_input")
    input_tokens = truncate_model_input(model_input, len(tokens) - 1)
    target_tokens = np.asarray(tokens[1:], dtype=np.int64)
    target_weights = weights_N[1 : len(target_tokens) + 1].copy()
    if reduction == "mean":
        total = float(target_weights.sum())
        if total != 0.0:
            target_weights = target_weights / total
    return Datum(
        model_input=input_tokens,
        loss_fn_inputs={
            "weights": TensorData.from_numpy(target_weights.astype(np.float32)),
            "target_tokens": TensorData.from_numpy(target_tokens),
        },
    )
