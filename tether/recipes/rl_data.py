"""Training datums for policy-gradient losses from a prompt and a sampled completion.

The datum reads prompt + completion shifted by one, as in supervised training. Prompt positions
carry advantage 0 and logprob 0, so only the sampled tokens are trained; each sampled token gets
its sequence's advantage (or its own, given one per token, as in distillation) and the logprob the
sampler reported for it (importance sampling and PPO compare the trainer's logprob against it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tether.types.data import Datum, ModelInput, TensorData
from tether.types.errors import UserInputError


def rl_datum(
    prompt: ModelInput,
    sampled_tokens: Sequence[int],
    sampled_logprobs: Sequence[float],
    advantage: float | Sequence[float],
) -> Datum:
    """A datum with `target_tokens`, `logprobs` and `advantages` over prompt + sampled tokens.

    `advantage` is one number for every sampled token, or one per sampled token.
    """
    if not sampled_tokens:
        raise UserInputError("is empty: nothing was sampled", field="sampled_tokens")
    if len(sampled_logprobs) != len(sampled_tokens):
        raise UserInputError(
            f"has {len(sampled_logprobs)} values for {len(sampled_tokens)} tokens", field="sampled_logprobs"
        )
    if not isinstance(advantage, int | float) and len(advantage) != len(sampled_tokens):
        raise UserInputError(
            f"has {len(advantage)} values for {len(sampled_tokens)} tokens", field="advantage"
        )
    prompt_tokens = prompt.to_ints()
    tokens = prompt_tokens + [int(t) for t in sampled_tokens]
    num_prompt_targets = len(prompt_tokens) - 1
    logprobs = np.zeros(len(tokens) - 1, dtype=np.float32)
    logprobs[num_prompt_targets:] = np.asarray(sampled_logprobs, dtype=np.float32)
    advantages = np.zeros(len(tokens) - 1, dtype=np.float32)
    advantages[num_prompt_targets:] = np.asarray(advantage, dtype=np.float32)
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": TensorData.from_numpy(np.asarray(tokens[1:], dtype=np.int64)),
            "logprobs": TensorData.from_numpy(logprobs),
            "advantages": TensorData.from_numpy(advantages),
        },
    )


def sampled_positions(prompt_length: int, num_sampled: int) -> slice:
    """Where the sampled tokens sit among a datum's targets (for reading trainer logprobs back)."""
    return slice(prompt_length - 1, prompt_length - 1 + num_sampled)
