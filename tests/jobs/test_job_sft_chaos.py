"""Recipe-level recovery: `tether sft` (train_sft) against a trainer job whose process is SIGKILLed
twice mid-run. Each time the loop reconnects (`reconnect_and_wait`) and reruns the recipe with the
same log_dir, which resumes from its last save_state with exactly the next batch; the final weights
and Adam moments equal an uninterrupted run's on the same job."""

from __future__ import annotations

import torch

from tether.client.jobs import TrainerJobConfig, TrainerJobManager
from tether.client.service_client import ServiceClient
from tether.recipes import sft
from tether.server.auth import owner_of_key
from tether.server.routes_jobs import job_manager
from tether.storage.owners import OwnerStores
from tether.types.errors import AuthenticationError, TetherError, UserInputError

from .conftest import ALICE, BASE

CONVERSATIONS = [
    [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": str(2 * i)}] for i in range(16)
]


def _sft(manager, job_id, log_dir, on_step_end=None, max_attempts=5):
    """Run SFT to the end, reconnecting to the job after each loss of it; returns (result, attempts)."""
    config = sft.Config(
        log_dir=log_dir,
        model_name=BASE,
        lora_rank=4,
        batch_size=4,
        num_epochs=1,
        save_every=1,
        eval_every=None,
        learning_rate=1e-3,
        seed=0,
        progress=False,
    )
    for attempt in range(1, max_attempts + 1):
        endpoint = manager.reconnect_and_wait(job_id, poll_interval_s=0.2, timeout_s=180)
        service = ServiceClient(base_url=endpoint.base_url, api_key=ALICE)
        try:
            return sft.train_sft(config, service, CONVERSATIONS, on_step_end=on_step_end), attempt
        except (UserInputError, AuthenticationError):
            raise
        except TetherError:
            continue
        finally:
            service.close()
    raise AssertionError("SFT did not finish")


def test_sft_recipe_survives_two_sigkills(control_plane, tmp_path):
    url, app = control_plane
    jobs = job_manager(app)
    manager = TrainerJobManager(url, ALICE)
    job_id = "sft-chaos"
    manager.create_and_wait(
        TrainerJobConfig(base_model=BASE, requested_job_id=job_id, max_restarts=5),
        poll_interval_s=0.2,
        timeout_s=180,
    )
    straight, attempts = _sft(manager, job_id, tmp_path / "straight")
    assert attempts == 1 and straight.steps_run == 4

    killed: list[int] = []

    def kill(step, metrics):
        if step in (1, 2) and step not in killed:  # after step 1's result, and again after step 2's
            killed.append(step)
            jobs.handle(owner_of_key(ALICE), job_id).kill()

    resumed, attempts = _sft(manager, job_id, tmp_path / "resumed", on_step_end=kill)
    assert killed == [1, 2] and attempts == 3

    stores = OwnerStores(jobs.job_dir(owner_of_key(ALICE), job_id) / "data")
    store = stores.store(owner_of_key(jobs._api_key(owner_of_key(ALICE), job_id)))
    a = store.load_training_state(straight.final_state_path, include_optimizer=True)
    b = store.load_training_state(resumed.final_state_path, include_optimizer=True)
    assert a.weights.keys() == b.weights.keys()
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert all(torch.equal(a.optimizer[k], b.optimizer[k]) for k in a.optimizer)
    manager.delete(job_id)
