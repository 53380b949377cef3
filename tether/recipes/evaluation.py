"""Held-out accuracy: greedy answers sampled through the server, scored by exact answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tether.recipes.addition import Problem, exact_answer_reward
from tether.recipes.compat import SdkTypes
from tether.renderers.base import Renderer
from tether.types.data import SamplingParams


def heldout_accuracy(
    sampling_client: Any, renderer: Renderer, problems: Sequence[Problem], max_tokens: int
) -> float:
    """Fraction of `problems` answered exactly with greedy decoding (all requests in flight at once)."""
    if not problems:
        return float("nan")
    sdk = SdkTypes(sampling_client)
    params = sdk.sampling_params(
        SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=renderer.get_stop_sequences())
    )
    futures = [
        sampling_client.sample(sdk.model_input(renderer.build_generation_prompt(p.messages)), 1, params)
        for p in problems
    ]
    correct = 0.0
    for problem, future in zip(problems, futures, strict=True):
        message, termination = renderer.parse_response(future.result().sequences[0].tokens)
        correct += exact_answer_reward(message, termination, problem.answer)
    return correct / len(problems)
