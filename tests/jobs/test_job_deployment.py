"""Dedicated mode end to end: a trainer job trains full weights and WeightSyncer hot-loads its
checkpoints onto deployments of the same control plane. The job writes sampler checkpoints into its
own data directory; the control plane finds them there, in the job `hot_load_trainer_job` names or,
without one, in any of the caller's jobs (before, it answered that they did not exist)."""

from __future__ import annotations

import numpy as np
import pytest

from tether.client.deployments import DeploymentConfig, DeploymentManager, WeightSyncer
from tether.client.jobs import TrainerJobConfig, TrainerJobManager
from tether.client.service_client import ServiceClient
from tether.types.data import AdamParams
from tether.types.errors import NotFoundError, UserInputError

from .conftest import ALICE, BASE, BOB, batch


def served_logprobs(deployments: DeploymentManager, deployment_id: str, tokens: list[int]) -> np.ndarray:
    answer = deployments._http.post(
        f"/api/v1/tether/deployments/{deployment_id}/v1/sample",
        json={"prompt_tokens": tokens, "max_tokens": 1, "include_prompt_logprobs": True},
    )
    assert answer.status_code == 200, answer.text
    return np.asarray(answer.json()["prompt_logprobs"][1:], np.float64)


def test_a_deployment_hot_loads_its_trainer_jobs_checkpoints(control_plane):
    url, _ = control_plane
    jobs = TrainerJobManager(url, ALICE)
    deployments = DeploymentManager(url, ALICE)
    with pytest.raises(UserInputError, match="hot_load_trainer_job"):
        deployments.create_or_get(
            DeploymentConfig(deployment_id="dep-nojob", base_model=BASE, hot_load_trainer_job="nope")
        )
    endpoint = jobs.create_and_wait(
        TrainerJobConfig(base_model=BASE, lora_rank=0, requested_job_id="train-dep"),
        poll_interval_s=0.2,
        timeout_s=180,
    )
    service = ServiceClient(base_url=endpoint.base_url, api_key=ALICE)
    try:
        deployments.create_or_get(
            DeploymentConfig(deployment_id="dep-job", base_model=BASE, hot_load_trainer_job="train-dep")
        )
        deployments.create_or_get(DeploymentConfig(deployment_id="dep-plain", base_model=BASE))
        deployments.wait_for_ready("dep-job", timeout_s=300)
        deployments.wait_for_ready("dep-plain", timeout_s=300)
        trainer = service.create_lora_training_client(BASE, rank=0, seed=0).result()
        syncer = WeightSyncer(trainer, deployments, "dep-job", base_model=BASE, rebase_fraction=None)
        tokens = batch(99)[0].model_input.to_ints()
        kinds, paths, wants = [], [], []
        for step in range(3):
            if step:
                trainer.forward_backward(batch(step), "cross_entropy").result()
                trainer.optim_step(AdamParams(learning_rate=1e-2)).result()
            path = syncer.save_and_hotload(f"step-{step}")
            paths.append(path)
            kinds.append(deployments.get("dep-job").raw["current"]["checkpoint_type"])
            expected = trainer.forward(batch(99), "cross_entropy").result()
            want = np.asarray(expected.loss_fn_outputs[0]["logprobs"].to_numpy(), np.float64)
            wants.append(want)
            np.testing.assert_allclose(served_logprobs(deployments, "dep-job", tokens), want[:-1], atol=1e-4)
        assert kinds == ["base", "delta", "delta"]
        # a deployment naming no job finds the checkpoints among the caller's jobs (the base, then a delta)
        for path, want in zip(paths[:2], wants[:2], strict=True):
            assert deployments.hotload_and_wait("dep-plain", BASE, path, timeout_seconds=120)
            np.testing.assert_allclose(
                served_logprobs(deployments, "dep-plain", tokens), want[:-1], atol=1e-4
            )
        path = paths[-1]
        # another key reaches neither this key's deployment nor, through its own, this key's job
        bob = DeploymentManager(url, BOB)
        with pytest.raises(NotFoundError):
            bob.hotload("dep-job", BASE, path)
        bob.create_or_get(DeploymentConfig(deployment_id="dep-bob", base_model=BASE))
        bob.wait_for_ready("dep-bob", timeout_s=300)
        with pytest.raises(NotFoundError, match="does not exist"):
            bob.hotload("dep-bob", BASE, path)
        bob.delete("dep-bob")
        assert deployments.get("dep-job").current_snapshot_identity == path
    finally:
        service.close()
        for deployment_id in ("dep-job", "dep-plain"):
            deployments.delete(deployment_id)
        jobs.delete("train-dep")
