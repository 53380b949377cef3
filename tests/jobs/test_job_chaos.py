"""Chaos: a training loop against a trainer job whose process is SIGKILLed twice, at random points
mid-run, finishes with exactly the weights (and Adam moments) of an uninterrupted run, and every
checkpoint it wrote is still listed and reads back verified.

The control plane notices each death and relaunches the job; `ReconnectingTrainingClient`
reconnects, restores the newest `save_state` with optimizer state and continues from its step.
"""

from __future__ import annotations

import random

import torch

from tether.client.jobs import TrainerJobConfig, TrainerJobManager
from tether.client.reconnect import ReconnectingTrainingClient
from tether.server.auth import owner_of_key
from tether.server.routes_jobs import job_manager
from tether.storage.owners import OwnerStores
from tether.types.data import AdamParams

from .conftest import ALICE, BASE, batch

NUM_STEPS = 8
SAVE_EVERY = 2


def _loop(manager, job_id, prefix, kill=None):
    def step_fn(client, step):
        if kill is not None:
            kill(step, "before")
        fb = client.forward_backward(batch(step), "cross_entropy")
        if kill is not None:
            kill(step, "during")
        fb.result()
        client.optim_step(AdamParams(learning_rate=1e-2)).result()
        if kill is not None:
            kill(step, "after")

    loop = ReconnectingTrainingClient(
        manager,
        job_id,
        base_model=BASE,
        lora_rank=4,
        seed=0,
        prefix=prefix,
        poll_interval_s=0.2,
        reconnect_timeout_s=180,
    )
    try:
        loop.run(step_fn, num_steps=NUM_STEPS, save_every=SAVE_EVERY)
    finally:
        loop.close()
    return loop


def test_training_survives_two_sigkills_with_identical_weights(control_plane):
    url, app = control_plane
    jobs = job_manager(app)
    manager = TrainerJobManager(url, ALICE)
    job_id = "chaos-1"
    manager.create_and_wait(
        TrainerJobConfig(base_model=BASE, lora_rank=4, requested_job_id=job_id, max_restarts=5),
        poll_interval_s=0.2,
        timeout_s=180,
    )

    reference = _loop(manager, job_id, "ref")
    assert reference.reconnects == 0

    rng = random.Random(11)
    plan = {
        (rng.randrange(1, 4), rng.choice(["before", "during", "after"])),
        (rng.randrange(5, NUM_STEPS), rng.choice(["before", "during", "after"])),
    }
    killed = []

    def kill(step, phase):
        if (step, phase) in plan and (step, phase) not in killed:
            killed.append((step, phase))
            jobs.handle(owner_of_key(ALICE), job_id).kill()

    chaos = _loop(manager, job_id, "chaos", kill)
    assert len(killed) == 2 and chaos.reconnects >= 2, (killed, chaos.reconnects)
    assert manager.get(job_id).restart_count >= 2

    # every checkpoint is listed and verifies (manifest sizes and sha256) on load
    listed = [c for c in manager.list_checkpoints(job_id) if c.resumable]
    stores = OwnerStores(jobs.job_dir(owner_of_key(ALICE), job_id) / "data")
    inner_owner = owner_of_key(jobs._api_key(owner_of_key(ALICE), job_id))
    states = {
        c.tinker_path: stores.store(inner_owner).load_training_state(c.tinker_path, include_optimizer=True)
        for c in listed
    }
    names = {c.tinker_path.rsplit("/", 1)[-1] for c in listed}
    expected = {
        f"{prefix}-step-{s:06d}" for prefix in ("ref", "chaos") for s in range(0, NUM_STEPS + 1, SAVE_EVERY)
    }
    assert expected <= names, expected - names

    def final(prefix):
        rows = [c for c in listed if c.tinker_path.endswith(f"{prefix}-step-{NUM_STEPS:06d}")]
        return states[max(rows, key=lambda c: c.create_time).tinker_path]

    ref, got = final("ref"), final("chaos")
    assert ref.weights.keys() == got.weights.keys() and ref.optimizer.keys() == got.optimizer.keys()
    for name in ref.weights:
        assert torch.equal(ref.weights[name], got.weights[name]), name
    for name in ref.optimizer:
        assert torch.equal(ref.optimizer[name], got.optimizer[name]), name
    start = states[[c.tinker_path for c in listed if c.tinker_path.endswith("ref-step-000000")][0]]
    assert any(not torch.equal(start.weights[n], ref.weights[n]) for n in ref.weights)  # it did train
    manager.delete(job_id)
