"""Multi-rank and multi-node trainer jobs through the SDK (gloo, CPU, the embedded tiny model):
a 2-rank job and a 2-"node" job on loopback (two torchrun invocations, c10d rendezvous) end with
the weights of a 1-rank job after the same steps (1e-5), and a 2-rank job whose rank is SIGKILLed
is torn down, relaunched as a whole and, restored from its newest save_state, ends the same."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch

from tether.client.jobs import TrainerJobConfig, TrainerJobManager
from tether.client.reconnect import ReconnectingTrainingClient
from tether.server.auth import owner_of_key
from tether.server.routes_jobs import job_manager
from tether.storage.owners import OwnerStores
from tether.types.data import AdamParams
from tether.types.errors import UserInputError

from .conftest import ALICE, BASE, batch

pytestmark = pytest.mark.slow

NUM_STEPS = 3
WAIT = dict(poll_interval_s=0.2, timeout_s=300)


def _train(url, app, job_id: str, kill=None, **resources) -> dict[str, torch.Tensor]:
    """NUM_STEPS LoRA steps on a new job through the SDK (saving every step); the final weights."""
    manager = TrainerJobManager(url, ALICE)
    manager.create_and_wait(
        TrainerJobConfig(base_model=BASE, lora_rank=4, requested_job_id=job_id, max_restarts=3, **resources),
        **WAIT,
    )

    def step_fn(client, step):
        fb = client.forward_backward(batch(step), "cross_entropy")
        if kill is not None:
            kill(step)
        fb.result()
        client.optim_step(AdamParams(learning_rate=1e-2)).result()

    loop = ReconnectingTrainingClient(
        manager, job_id, base_model=BASE, lora_rank=4, seed=0, prefix="w", poll_interval_s=0.2,
        reconnect_timeout_s=300,
    )  # fmt: skip
    try:
        loop.run(step_fn, num_steps=NUM_STEPS, save_every=1)
    finally:
        loop.close()
    jobs, owner = job_manager(app), owner_of_key(ALICE)
    final = [c for c in manager.list_checkpoints(job_id) if c.tinker_path.endswith(f"w-step-{NUM_STEPS:06d}")]
    stores = OwnerStores(jobs.job_dir(owner, job_id) / "data")
    inner_owner = owner_of_key(jobs._api_key(owner, job_id))
    state = stores.store(inner_owner).load_training_state(final[-1].tinker_path, include_optimizer=False)
    manager.delete(job_id)
    return {name: tensor.float() for name, tensor in state.weights.items()}


@pytest.fixture(scope="module")
def one_rank_weights(control_plane):
    url, app = control_plane
    return _train(url, app, "mr-one")


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("nproc_per_node", "node_count"), [(2, 1), (1, 2)], ids=["two-ranks", "two-nodes-loopback"]
)
def test_multi_rank_job_trains_like_one_rank(control_plane, one_rank_weights, nproc_per_node, node_count):
    url, app = control_plane
    seen = {}

    def look(step):
        handle = job_manager(app).handle(owner_of_key(ALICE), job_id)
        seen["nodes"] = len(handle.pids)

    job_id = f"mr-{nproc_per_node}x{node_count}"
    weights = _train(url, app, job_id, kill=look, nproc_per_node=nproc_per_node, node_count=node_count)
    assert seen["nodes"] == node_count  # one torchrun invocation per node
    _assert_same(weights, one_rank_weights)


def test_a_killed_rank_tears_down_and_recovers_the_job(control_plane, one_rank_weights):
    url, app = control_plane
    jobs, owner = job_manager(app), owner_of_key(ALICE)
    killed = []

    def kill(step):
        if step == 2 and not killed:
            agent = jobs.handle(owner, "mr-kill").pid
            ranks = subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True).stdout.split()
            assert len(ranks) == 2, ranks
            os.kill(int(max(ranks, key=int)), signal.SIGKILL)  # one rank, not the job's leader
            killed.append(ranks)

    weights = _train(url, app, "mr-kill", kill=kill, nproc_per_node=2)
    assert killed
    assert TrainerJobManager(url, ALICE).get("mr-kill").restart_count >= 1
    _assert_same(weights, one_rank_weights)
    for pid in killed[0]:  # the old group is gone: no rank outlived the relaunch
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


def test_impossible_resources_are_refused_naming_the_field(control_plane):
    url, _ = control_plane
    manager = TrainerJobManager(url, ALICE)
    cpus = os.cpu_count() or 1
    with pytest.raises(UserInputError, match="nproc_per_node"):
        manager.create(TrainerJobConfig(base_model=BASE, nproc_per_node=cpus + 1))
    with pytest.raises(UserInputError, match="node_count"):
        manager.create(TrainerJobConfig(base_model=BASE, nproc_per_node=cpus, node_count=2))
