"""Dedicated mode end to end: a trainer job trains full weights and WeightSyncer hot-loads its
checkpoints (a base, then a delta) onto a deployment of the same control plane. The deployment
used to look only in the server's own checkpoints and answered that the job's did not exist."""

from __future__ import annotations

import asyncio

import pytest

from tether.client.deployments import DeploymentConfig, DeploymentManager, WeightSyncer
from tether.client.jobs import TrainerJobConfig, TrainerJobManager
from tether.client.service_client import ServiceClient
from tether.types.data import AdamParams
from tether.types.errors import NotFoundError

from .conftest import ALICE, BASE, BOB, batch


def test_a_jobs_checkpoints_hot_load_onto_a_deployment(control_plane):
    url, _ = control_plane
    endpoint = TrainerJobManager(url, ALICE).create_and_wait(
        TrainerJobConfig(base_model=BASE, lora_rank=0, requested_job_id="dedicated-1"),
        poll_interval_s=0.2,
        timeout_s=180,
    )
    service = ServiceClient(base_url=endpoint.base_url, api_key=ALICE)
    trainer = service.create_lora_training_client(BASE, rank=0, seed=0).result()
    manager = DeploymentManager(url, ALICE)
    manager.create_or_get(DeploymentConfig(deployment_id="dep-job", base_model=BASE))
    manager.wait_for_ready("dep-job", timeout_s=300)
    syncer = WeightSyncer(policy_client=trainer, deploy_mgr=manager, deployment_id="dep-job", base_model=BASE)
    kinds = []
    for step in range(2):
        trainer.forward_backward(batch(step), "cross_entropy").result()
        trainer.optim_step(AdamParams(learning_rate=1e-3)).result()
        path = syncer.save_and_hotload(f"step-{step}")  # raises unless the deployment serves it
        kinds.append(manager.get("dep-job").raw["current"]["checkpoint_type"])
    assert kinds == ["base", "delta"]
    sampler = syncer.get_deployment_sampler()
    [completion] = asyncio.run(sampler.sample_with_prompt_tokens([5, 6, 7], max_tokens=3))
    assert completion.weights_identity == path

    # another key's job checkpoint is not found through this one's deployment
    bob = DeploymentManager(url, BOB)
    bob.create_or_get(DeploymentConfig(deployment_id="dep-bob", base_model=BASE))
    bob.wait_for_ready("dep-bob", timeout_s=300)
    with pytest.raises(NotFoundError, match="does not exist"):
        bob.hotload("dep-bob", BASE, path)
    bob.delete("dep-bob")
    manager.delete("dep-job")
    service.close()
