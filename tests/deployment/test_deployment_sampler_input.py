"""DeploymentSampler refuses a request it could only answer wrongly, before sending anything."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tether.client.deployments import DeploymentManager, DeploymentSampler, WeightSyncer
from tether.types.errors import UserInputError


@pytest.mark.parametrize(
    ("prompt", "n", "field"),
    [
        ([1, 2], 0, "n"),
        ([1, 2], -3, "n"),
        ([1, 2], 1.5, "n"),
        ([], 1, "prompt_token_ids"),
        ([1, 2.7], 1, "prompt_token_ids"),
        ([True], 1, "prompt_token_ids"),
    ],
)
def test_bad_n_or_prompt_is_refused_before_any_request(prompt, n, field):
    sampler = DeploymentSampler("http://127.0.0.1:1", "dep")  # nothing listens there
    with pytest.raises(UserInputError) as info:
        asyncio.run(sampler.sample_with_prompt_tokens(prompt, n=n, max_tokens=2))
    assert info.value.field == field


def test_numpy_token_ids_are_token_ids():
    sampler = DeploymentSampler("http://127.0.0.1:1", "dep")
    sent = []

    async def one(body, seed):
        sent.append((body["prompt"], seed))
        return []

    sampler._one = one
    asyncio.run(sampler.sample_with_prompt_tokens(np.array([1, 2]), n=2, max_tokens=2, seed=7))
    assert sent == [([1, 2], 7), ([1, 2], 8)] and all(type(t) is int for t in sent[0][0])


def test_weight_syncer_names_a_policy_client_that_cannot_save_deltas():
    class TinkerLikeClient:  # the official SDK's TrainingClient has save_weights_for_sampler only
        def save_weights_for_sampler(self, name):
            raise AssertionError("not called")

    manager = DeploymentManager("http://127.0.0.1:1")  # nothing listens there
    syncer = WeightSyncer(policy_client=TinkerLikeClient(), deploy_mgr=manager, deployment_id="dep")
    with pytest.raises(UserInputError) as info:
        syncer.save_and_hotload("step-0")
    assert info.value.field == "policy_client" and "TinkerLikeClient" in str(info.value)
    assert not syncer.base_saved
