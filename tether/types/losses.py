"""The built-in losses' table: names, the inputs each needs and its config keys with defaults.

This is the one definition of which losses exist (tinker-protocol.md §5.4). The server checks a
request against it before queueing anything; the engine pairs each name with its computation
(`tether.engine.losses`). Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from tether.types.errors import UserInputError


@dataclass(frozen=True)
class LossSpec:
    """What a built-in loss needs from a request."""

    required_inputs: tuple[str, ...]
    """Keys of `loss_fn_inputs` that must be present (besides the model input)."""
    config_defaults: Mapping[str, float | None]
    """Accepted `loss_fn_config` keys and their defaults; None means the key is required."""
    optional_inputs: tuple[str, ...] = ()
    """Keys of `loss_fn_inputs` the loss reads when present."""
    per_sequence: bool = False
    """The loss couples a datum's tokens (a sequence-level ratio), so it is computed datum by datum."""
    needs_provenance: bool = False
    """Every datum must carry provenance spans naming sequences sampled with
    `record_stability_info=true`; the server fills `logprobs` and `sampled_mask` from its records."""


_RL_INPUTS = ("target_tokens", "logprobs", "advantages")
_CLIP_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
GSPO_CLIP_DEFAULTS = {"clip_low_threshold": 1.0 - 3e-4, "clip_high_threshold": 1.0 + 4e-4}
"""GSPO clips a sequence-level (length-normalised) ratio, so its band is far narrower than PPO's:
the GSPO paper's (Zheng et al., 2025) eps_low = 3e-4, eps_high = 4e-4."""
STABLE_REINFORCE_DEFAULTS = {"kl_coeff": 0.0, "ratio_cap": 2.0}

LOSS_SPECS: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(("target_tokens", "weights"), {}),
    "importance_sampling": LossSpec(_RL_INPUTS, {}),
    "ppo": LossSpec(_RL_INPUTS, _CLIP_DEFAULTS),
    "cispo": LossSpec(_RL_INPUTS, _CLIP_DEFAULTS),
    "dro": LossSpec(_RL_INPUTS, {"beta": None}),
    "gspo": LossSpec(
        _RL_INPUTS, GSPO_CLIP_DEFAULTS, optional_inputs=("sequence_ratio_mask",), per_sequence=True
    ),
    "reinforce": LossSpec(("target_tokens", "advantages"), {}),
    "stable_reinforce": LossSpec(
        ("target_tokens", "logprobs", "advantages", "sampled_mask"),
        STABLE_REINFORCE_DEFAULTS,
        needs_provenance=True,
    ),
}
"""The built-in losses by the name clients send as `loss_fn`."""


def get_loss_spec(loss_fn: str) -> LossSpec:
    """The loss named `loss_fn`, or `UserInputError` naming the field."""
    spec = LOSS_SPECS.get(loss_fn) if isinstance(loss_fn, str) else None
    if spec is None:
        raise UserInputError(f"unknown loss {loss_fn!r}; supported: {sorted(LOSS_SPECS)}", field="loss_fn")
    return spec


def resolve_loss_config(loss_fn: str, loss_fn_config: Mapping[str, object] | None) -> dict[str, float]:
    """Fill defaults into `loss_fn_config` and check it: known keys, finite numbers, low <= high."""
    spec = get_loss_spec(loss_fn)
    given = dict(loss_fn_config or {})
    for key in given:
        if key not in spec.config_defaults:
            raise UserInputError(
                f"not accepted by loss {loss_fn!r} (accepted: {sorted(spec.config_defaults)})",
                field=f"loss_fn_config.{key}",
            )
    resolved: dict[str, float] = {}
    for key, default in spec.config_defaults.items():
        value = given.get(key, default)
        if value is None:
            raise UserInputError(f"required by loss {loss_fn!r}", field=f"loss_fn_config.{key}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserInputError(f"must be a finite number, got {value!r}", field=f"loss_fn_config.{key}")
        resolved[key] = float(value)
    if "clip_low_threshold" in resolved and resolved["clip_low_threshold"] > resolved["clip_high_threshold"]:
        raise UserInputError("must not exceed clip_high_threshold", field="loss_fn_config.clip_low_threshold")
    if resolved.get("kl_coeff", 0.0) < 0:
        raise UserInputError("must be >= 0", field="loss_fn_config.kl_coeff")
    if "ratio_cap" in resolved and resolved["ratio_cap"] <= 0:
        raise UserInputError("must be > 0", field="loss_fn_config.ratio_cap")
    return resolved
