"""Request checks done at submit, without a model."""

from __future__ import annotations

import numpy as np
import pytest

from tether.types.errors import UserInputError
from tether.types.sample_request import ModelLimits, SampleRequest, validate_request

LIMITS = ModelLimits(vocab_size=264, max_context_length=64, eos_token_ids=(256,))


def test_numpy_token_ids_are_accepted_as_plain_ints():
    validated = validate_request(
        SampleRequest(np.array([1, 2, 3]), max_tokens=2, stop=list(np.array([7]))), LIMITS
    )
    assert validated.prompt_tokens == (1, 2, 3) and all(type(t) is int for t in validated.prompt_tokens)
    assert validated.stop.token_ids == {7, 256}
    with pytest.raises(UserInputError) as err:
        validate_request(SampleRequest([1, True], max_tokens=2), LIMITS)
    assert err.value.field == "prompt"


def test_topk_counts_are_capped_by_the_vocabulary_and_the_answer_size():
    from tether.types.errors import UserInputError

    for name in ("topk_prompt_logprobs", "topk_sample_logprobs"):
        with pytest.raises(UserInputError) as caught:
            validate_request(SampleRequest((1, 2, 3), max_tokens=2, **{name: 10**9}), LIMITS)
        assert caught.value.field == name and "vocabulary" in caught.value.message
        validate_request(SampleRequest((1, 2, 3), max_tokens=2, **{name: LIMITS.vocab_size}), LIMITS)
    small = ModelLimits(vocab_size=264, max_context_length=64, max_topk_entries=100)
    with pytest.raises(UserInputError) as caught:
        validate_request(
            SampleRequest((1, 2, 3), num_samples=4, max_tokens=10, topk_sample_logprobs=5), small
        )
    assert caught.value.field == "topk_sample_logprobs"
