"""Tinker's built-in losses, token-level and summed (tinker-protocol.md §5.4).

Each loss takes the learner's log-probabilities of one datum's targets (`target_lp`, with the shape of
`target_tokens`), that datum's validated loss inputs and the resolved config, and returns the summed
loss plus any extra per-token outputs. Losses are computed per datum so a request's total does not
depend on how it is split into micro-batches.

This module knows nothing about models or batching.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from tether.types.losses import LOSS_SPECS, LossSpec, get_loss_spec, resolve_loss_config

__all__ = ["LOSSES", "LossDefinition", "get_loss", "resolve_loss_config"]

LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class LossDefinition:
    """A built-in loss: its table entry (`tether.types.losses`) and its computation."""

    spec: LossSpec
    compute: Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float]], LossOutput]

    @property
    def required_inputs(self) -> tuple[str, ...]:
        return self.spec.required_inputs


def cross_entropy_loss(
    target_lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> LossOutput:
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


def ppo_loss(
    target_lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> LossOutput:
    """-sum(min(r * A, clamp(r, low, high) * A)) with r = exp(target_lp - sampling_lp)."""
    ratio = _ratio(target_lp, inputs)
    advantages = inputs["advantages"]
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.minimum(ratio * advantages, clipped * advantages).sum(), {}


def cispo_loss(
    target_lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> LossOutput:
    """-sum(stop_gradient(clamp(r, low, high)) * target_lp * A)."""
    ratio = _ratio(target_lp, inputs).detach()
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    return -(clipped * target_lp * inputs["advantages"]).sum(), {}


def dro_loss(
    target_lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> LossOutput:
    """-sum(target_lp * A - 0.5 * beta * (target_lp - sampling_lp)^2)."""
    advantages = inputs["advantages"]
    penalty = 0.5 * config["beta"] * (target_lp - inputs["logprobs"]) ** 2
    return -(target_lp * advantages - penalty).sum(), {}


_COMPUTE = {
    "cross_entropy": cross_entropy_loss,
    "importance_sampling": importance_sampling_loss,
    "ppo": ppo_loss,
    "cispo": cispo_loss,
    "dro": dro_loss,
}

LOSSES: dict[str, LossDefinition] = {
    name: LossDefinition(spec, _COMPUTE[name]) for name, spec in LOSS_SPECS.items()
}
"""The built-in losses by the name clients send as `loss_fn`."""


def get_loss(loss_fn: str) -> LossDefinition:
    """The loss named `loss_fn`, or `UserInputError` naming the field."""
    get_loss_spec(loss_fn)
    return LOSSES[loss_fn]
