"""Tinker's built-in losses, token-level and summed (tinker-protocol.md §5.4).

Each loss takes the learner's log-probabilities of one datum's targets (`target_lp`, with the shape of
`target_tokens`), that datum's validated loss inputs and the resolved config, and returns the summed
loss plus any extra per-token outputs. A request's total never depends on how it is split into
micro-batches: element-wise losses may be given several datums concatenated, while a loss whose spec
is `per_sequence` (gspo: one ratio per datum) is always given one datum at a time.

Formulas for the losses whose hosted definition is not published (gspo, reinforce, stable_reinforce)
are tether's own and are written in their docstrings and in the README.

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


def reinforce_loss(
    target_lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> LossOutput:
    """-sum(target_lp * A): plain REINFORCE, no importance ratio (`logprobs`, if sent, is unused)."""
    return -(target_lp * inputs["advantages"]).sum(), {}


def gspo_loss(
    target_lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> LossOutput:
    """GSPO with a sequence-level ratio, summed over tokens (the GSPO-token form).

    With m = `sequence_ratio_mask` (default: 1 where A != 0), the datum's ratio is
    s = exp(sum(m * (target_lp - sampling_lp)) / sum(m)) (s = 1 when sum(m) = 0), each token's ratio
    s_t = sg(s) * exp(target_lp_t - sg(target_lp_t)) (equal to s in value; its gradient flows through
    that token only), and the loss is -sum(m * min(s_t * A, clamp(s_t, low, high) * A)).
    With one advantage per sequence this is sum(m) times the GSPO paper's per-sequence objective.
    """
    advantages = inputs["advantages"]
    mask = inputs.get("sequence_ratio_mask")
    if mask is None:
        mask = (advantages != 0).to(target_lp.dtype)
    count = mask.sum()
    log_ratio = (mask * (target_lp - inputs["logprobs"])).sum() / count.clamp(min=1.0)
    ratio = torch.exp(log_ratio.detach() + target_lp - target_lp.detach())
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    return -(mask * torch.minimum(ratio * advantages, clipped * advantages)).sum(), {}


def stable_reinforce_loss(
    target_lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> LossOutput:
    """REINFORCE with a truncated, stop-gradient importance weight and an optional KL penalty.

    Over the sampled positions m = `sampled_mask` (the server fills it, and `logprobs` = q, from the
    records it kept when the sequences were sampled), with r = exp(target_lp - q):
    loss = -sum(m * sg(min(r, ratio_cap)) * A * target_lp) + kl_coeff * sum(m * (r - 1 - log r)).
    The second sum is the k3 estimate of KL(sampler || learner) on the sampler's own tokens.
    """
    mask = inputs["sampled_mask"]
    log_ratio = target_lp - inputs["logprobs"]
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio.detach(), max=config["ratio_cap"])
    loss = -(mask * weight * inputs["advantages"] * target_lp).sum()
    if config["kl_coeff"] != 0.0:
        loss = loss + config["kl_coeff"] * (mask * (ratio - 1.0 - log_ratio)).sum()
    return loss, {}


_COMPUTE = {
    "cross_entropy": cross_entropy_loss,
    "importance_sampling": importance_sampling_loss,
    "ppo": ppo_loss,
    "cispo": cispo_loss,
    "dro": dro_loss,
    "gspo": gspo_loss,
    "reinforce": reinforce_loss,
    "stable_reinforce": stable_reinforce_loss,
}

LOSSES: dict[str, LossDefinition] = {
    name: LossDefinition(spec, _COMPUTE[name]) for name, spec in LOSS_SPECS.items()
}
"""The built-in losses by the name clients send as `loss_fn`."""


def get_loss(loss_fn: str) -> LossDefinition:
    """The loss named `loss_fn`, or `UserInputError` naming the field."""
    get_loss_spec(loss_fn)
    return LOSSES[loss_fn]
