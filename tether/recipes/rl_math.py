"""The arithmetic of GRPO, kept apart from any client so it is tested on its own.

Advantages are reward minus the group's mean (no division by the standard deviation, as in the
tinker-cookbook since its PR #589). The sampler-vs-trainer KL compares the logprobs the sampler
reported for the sampled tokens with the trainer's logprobs of the same tokens under the same
weights; on a healthy backend both estimators are close to 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from tether.types.errors import UserInputError


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """reward_i - mean(rewards) for one group of samples of the same prompt."""
    if not rewards:
        raise UserInputError("a group needs at least one reward", field="rewards")
    mean = sum(rewards) / len(rewards)
    return [float(r) - mean for r in rewards]


def kl_sample_train(
    sampler_logprobs: Sequence[Sequence[float]], trainer_logprobs: Sequence[Sequence[float]]
) -> dict[str, float]:
    """Token-mean KL estimates between sampler and trainer over the sampled tokens of each sequence.

    v1 = mean(logq - logp), v2 = mean((logq - logp)^2 / 2), with q the sampler and p the trainer.
    """
    if len(sampler_logprobs) != len(trainer_logprobs):
        raise UserInputError(
            "sampler and trainer logprobs need one entry per sequence", field="trainer_logprobs"
        )
    total_v1 = total_v2 = 0.0
    count = 0
    for index, (sampled, trained) in enumerate(zip(sampler_logprobs, trainer_logprobs, strict=True)):
        if len(sampled) != len(trained):
            raise UserInputError(
                f"has {len(trained)} logprobs for {len(sampled)} sampled tokens",
                field="trainer_logprobs",
                datum_index=index,
            )
        for q, p in zip(sampled, trained, strict=True):
            diff = float(q) - float(p)
            total_v1 += diff
            total_v2 += 0.5 * diff * diff
            count += 1
    if count == 0:
        return {"kl_sample_train_v1": 0.0, "kl_sample_train_v2": 0.0}
    return {"kl_sample_train_v1": total_v1 / count, "kl_sample_train_v2": total_v2 / count}
