"""The plain data the training engine takes and returns, shared by the engine and its callers.

Tensors here are already torch tensors: converting wire types (TensorData, protobuf) is the
server's job, and checking values against the model is `tether.engine.validation`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tether.types.errors import UserInputError
from tether.types.wire import AdamParams
from tether.types.wire_training import MAX_LEARNING_RATE


@dataclass
class EngineDatum:
    """One training example: the tokens the model reads and the tensors its loss needs."""

    input_tokens: torch.Tensor
    """int64 (N,): position i predicts `loss_fn_inputs["target_tokens"][i]`."""
    loss_fn_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """`target_tokens` (N,) or (N, K) int64; `weights`, `logprobs`, `advantages` float32, same shape."""


@dataclass
class ForwardResult:
    """Per-datum outputs (in request order) and request-level metrics."""

    outputs: list[dict[str, torch.Tensor]]
    """Per datum: `logprobs` (shape of target_tokens); `elementwise_loss` for cross_entropy."""
    metrics: dict[str, float]
    """Keys are `name:reduction` (the Tinker SDK reduces chunks by the suffix); at least `loss:sum`."""


@dataclass(frozen=True)
class LossRequest:
    """One model's forward (or forward_backward) as a part of `TrainingEngine.forward_backward_fused`."""

    model_id: str
    data: Sequence[EngineDatum]
    loss_fn: str
    loss_fn_config: dict | None = None
    backward: bool = True
    """Accumulate the loss's gradients into the model's (forward_backward); False: forward only."""


@dataclass(frozen=True)
class AdamWParams:
    """Hyperparameters of one optimizer step (Tinker's AdamParams); all may change between steps.

    Bounds (`validate`): every value finite; learning_rate in [0, MAX_LEARNING_RATE]; beta1, beta2
    in [0, 1); eps > 0; weight_decay >= 0 with learning_rate * weight_decay <= 1 (a larger decay
    flips the weights' sign); grad_clip_norm >= 0.
    """

    learning_rate: float = 1e-4
    """Step size."""
    beta1: float = 0.9
    """Decay of the first-moment estimate."""
    beta2: float = 0.95
    """Decay of the second-moment estimate."""
    eps: float = 1e-12
    """Added to the denominator's square root."""
    weight_decay: float = 0.0
    """Decoupled weight decay: w -= learning_rate * weight_decay * w."""
    grad_clip_norm: float = 0.0
    """Clip the global gradient norm to this value before the step; 0 means no clipping."""

    @classmethod
    def from_adam_params(cls, params: AdamParams) -> AdamWParams:
        """The engine's step settings from the wire's `AdamParams` (the one definition of the concept)."""
        return cls(**params.model_dump())

    def validate(self) -> None:
        """Raise `UserInputError` naming the first invalid field."""
        for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserInputError(
                    f"invalid value {value!r}: must be a finite number", field=f"adam_params.{name}"
                )
        checks = {
            "learning_rate": (
                0 <= self.learning_rate <= MAX_LEARNING_RATE,
                f"must be in [0, {MAX_LEARNING_RATE}]",
            ),
            "beta1": (0 <= self.beta1 < 1, "must be in [0, 1)"),
            "beta2": (0 <= self.beta2 < 1, "must be in [0, 1)"),
            "eps": (self.eps > 0, "must be > 0"),
            "weight_decay": (
                self.weight_decay >= 0 and self.learning_rate * self.weight_decay <= 1,
                "must be >= 0 with learning_rate * weight_decay <= 1",
            ),
            "grad_clip_norm": (self.grad_clip_norm >= 0, "must be >= 0"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise UserInputError(
                    f"invalid value {getattr(self, name)!r}: {rule}", field=f"adam_params.{name}"
                )


@dataclass(frozen=True)
class GraphHandle:
    """Names an autograd graph kept by `forward_keep_graph` until its backward or release."""

    graph_id: str
    model_id: str
