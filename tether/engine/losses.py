"""Tinker's built-in losses, token-level and summed (tinker-protocol.md §5.4).

Each loss takes the learner's log-probabilities of one datum's targets (`target_lp`, with the shape of
`target_tokens`), that datum's validated loss inputs and the resolved config, and returns the summed
loss plus any extra per-token outputs. Losses are computed per datum so a request's total does not
depend on how it is split into micro-batches.

This module knows nothing about models or batching.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from tether.types.errors import UserInputError

LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class LossDefinition:
    """What a loss needs and how it is computed."""

    required_inputs: tuple[str, ...]
    """Keys of `loss_fn_inputs` that must be present (besides the model input)."""
    config_defaults: Mapping[str, float | None]
    """Accepted `loss_fn_config` keys and their defaults; None means the key is required."""
    compute: Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float]], LossOutput]


def cross_entropy_loss(target_lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]) -> LossOutput:
    """sum(-target_lp * weights); weights may have any sign."""
    elementwise = -target_lp * inputs["weights"]
    return elementwise.sum(), {"elementwise_loss": elementwise}


def _ratio(target_lp: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.exp(target_lp - inputs["logprobs"])


def importance_sampling_loss(
    target_lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> LossOutput:
    """-sum(exp(target_lp - sampling_lp) * advantages)."""
    return -(_ratio(target_lp, inputs) * inputs["advantages"]).sum(), {}


def ppo_loss(target_lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]) -> LossOutput:
    """-sum(min(r * A, clamp(r, low, high) * A)) with r = exp(target_lp - sampling_lp)."""
    ratio = _ratio(target_lp, inputs)
    advantages = inputs["advantages"]
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.minimum(ratio * advantages, clipped * advantages).sum(), {}


def cispo_loss(target_lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]) -> LossOutput:
    """-sum(stop_gradient(clamp(r, low, high)) * target_lp * A)."""
    ratio = _ratio(target_lp, inputs).detach()
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    return -(clipped * target_lp * inputs["advantages"]).sum(), {}


def dro_loss(target_lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]) -> LossOutput:
    """-sum(target_lp * A - 0.5 * beta * (target_lp - sampling_lp)^2)."""
    advantages = inputs["advantages"]
    penalty = 0.5 * config["beta"] * (target_lp - inputs["logprobs"]) ** 2
    return -(target_lp * advantages - penalty).sum(), {}


_RL_INPUTS = ("target_tokens", "logprobs", "advantages")
_CLIP_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}

LOSSES: dict[str, LossDefinition] = {
    "cross_entropy": LossDefinition(("target_tokens", "weights"), {}, cross_entropy_loss),
    "importance_sampling": LossDefinition(_RL_INPUTS, {}, importance_sampling_loss),
    "ppo": LossDefinition(_RL_INPUTS, _CLIP_DEFAULTS, ppo_loss),
    "cispo": LossDefinition(_RL_INPUTS, _CLIP_DEFAULTS, cispo_loss),
    "dro": LossDefinition(_RL_INPUTS, {"beta": None}, dro_loss),
}
"""The built-in losses by the name clients send as `loss_fn`."""


def get_loss(loss_fn: str) -> LossDefinition:
    """The loss named `loss_fn`, or `UserInputError` naming the field."""
    definition = LOSSES.get(loss_fn) if isinstance(loss_fn, str) else None
    if definition is None:
        raise UserInputError(f"unknown loss {loss_fn!r}; supported: {sorted(LOSSES)}", field="loss_fn")
    return definition


def resolve_loss_config(loss_fn: str, loss_fn_config: Mapping[str, object] | None) -> dict[str, float]:
    """Fill defaults into `loss_fn_config` and check it: known keys, finite numbers, low <= high."""
    definition = get_loss(loss_fn)
    given = dict(loss_fn_config or {})
    for key in given:
        if key not in definition.config_defaults:
            raise UserInputError(
                f"not accepted by loss {loss_fn!r} (accepted: {sorted(definition.config_defaults)})",
                field=f"loss_fn_config.{key}",
            )
    resolved: dict[str, float] = {}
    for key, default in definition.config_defaults.items():
        value = given.get(key, default)
        if value is None:
            raise UserInputError(f"required by loss {loss_fn!r}", field=f"loss_fn_config.{key}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserInputError(f"must be a finite number, got {value!r}", field=f"loss_fn_config.{key}")
        resolved[key] = float(value)
    if "clip_low_threshold" in resolved and resolved["clip_low_threshold"] > resolved["clip_high_threshold"]:
        raise UserInputError("must not exceed clip_high_threshold", field="loss_fn_config.clip_low_threshold")
    return resolved
