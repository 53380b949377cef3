"""A deployment fed by a dedicated trainer job (`DeploymentConfig.hot_load_trainer_job`): the job
writes sampler checkpoints into its own data directory, and the control plane hot-loads them from
there, so WeightSyncer works against a job's training client as against `tether serve`'s own."""

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
        kinds = []
        for step in range(3):
            if step:
                trainer.forward_backward(batch(step), "cross_entropy").result()
                trainer.optim_step(AdamParams(learning_rate=1e-2)).result()
            path = syncer.save_and_hotload(f"step-{step}")
            kinds.append(deployments.get("dep-job").raw["current"]["checkpoint_type"])
            expected = trainer.forward(batch(99), "cross_entropy").result()
            want = np.asarray(expected.loss_fn_outputs[0]["logprobs"].to_numpy(), np.float64)
            np.testing.assert_allclose(served_logprobs(deployments, "dep-job", tokens), want[:-1], atol=1e-4)
        assert kinds == ["base", "delta", "delta"]
        # a deployment not tied to the job cannot reach its checkpoints; another key cannot either
        with pytest.raises(NotFoundError, match="hot_load_trainer_job"):
            deployments.hotload("dep-plain", BASE, path)
        with pytest.raises(NotFoundError):
            DeploymentManager(url, BOB).hotload("dep-job", BASE, path)
        assert deployments.get("dep-job").current_snapshot_identity == path
    finally:
        service.close()
        for deployment_id in ("dep-job", "dep-plain"):
            deployments.delete(deployment_id)
        jobs.delete("train-dep")
