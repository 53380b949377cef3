"""How long a dedicated trainer job takes to become useful, next to its trainer's own model-load time.

Against a control plane (`tether serve` in a thread, local launcher), for each of `--reps` jobs:
1. startup:  `TrainerJobManager.create_and_wait` -> first completed training step (create the training
             client through the control plane, forward_backward, optim_step), wall time;
2. recovery: SIGKILL the job's process after a `save_state` -> the control plane relaunches it ->
             `ReconnectingTrainingClient`-style reconnect (`reconnect_and_wait`, restore the save with
             optimizer) -> first completed step again, wall time;
each printed beside the model-load time the job's trainer measured itself (`model_load_s`, from the
same launch), as a ratio. Target: both <= 1.5 x the model-load time. The difference is process
start-up (Python + torch imports), readiness polling, and the client's own requests.

    PYTHONPATH=. python bench/job_startup.py [--model tether/tiny-qwen3] [--reps 2] [--poll 0.2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from tether.client import ServiceClient
from tether.client.jobs import TrainerJobConfig, TrainerJobManager
from tether.server.auth import owner_of_key
from tether.server.config import ServerConfig
from tether.server.main import ServerThread
from tether.types.data import AdamParams, Datum, ModelInput

KEY = "tml-bench"


def _batch() -> list[Datum]:
    tokens = np.arange(3, 36, dtype=np.int64)
    return [
        Datum(
            model_input=ModelInput.from_ints(tokens[:-1].tolist()),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": np.ones(len(tokens) - 1, np.float32)},
        )
    ]


def _step(trainer) -> None:
    trainer.forward_backward(_batch(), "cross_entropy").result()
    trainer.optim_step(AdamParams(learning_rate=1e-4)).result()


def _wait_relaunched(manager: TrainerJobManager, job_id: str, poll_s: float) -> None:
    """Until the control plane has noticed the death and relaunched the job."""
    deadline = time.monotonic() + 600
    while manager.get(job_id).restart_count < 1:
        if time.monotonic() > deadline:
            raise TimeoutError("the job was not relaunched")
        time.sleep(poll_s / 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tether/tiny-qwen3")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--poll", type=float, default=0.2, help="control plane and client poll interval (s)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the training client")
    args = parser.parse_args()

    config = ServerConfig(
        port=0,
        data_dir=tempfile.mkdtemp(prefix="tether-bench-jobs-"),
        api_keys=[KEY],
        models=[args.model],
        job_poll_interval_s=args.poll,
        log_level="warning",
    )
    rows = []
    server = ServerThread(config)
    url = server.start()
    try:
        server_jobs = server.app.state.tether_jobs
        manager = TrainerJobManager(url, KEY)
        for rep in range(args.reps):
            job_id = f"bench-{rep}"
            started = time.monotonic()
            endpoint = manager.create_and_wait(
                TrainerJobConfig(base_model=args.model, requested_job_id=job_id),
                poll_interval_s=args.poll,
                timeout_s=600,
            )
            service = ServiceClient(base_url=endpoint.base_url, api_key=KEY)
            trainer = service.create_lora_training_client(args.model, rank=args.rank, seed=0).result()
            _step(trainer)
            startup_s = time.monotonic() - started
            load_s = manager.get(job_id).model_load_s
            path = trainer.save_state("bench").result().path
            service.close()

            killed = time.monotonic()
            server_jobs.handle(owner_of_key(KEY), job_id).kill()
            _wait_relaunched(manager, job_id, args.poll)
            endpoint = manager.reconnect_and_wait(job_id, poll_interval_s=args.poll, timeout_s=600)
            service = ServiceClient(base_url=endpoint.base_url, api_key=KEY)
            trainer = service.create_training_client_from_state_with_optimizer(path).result()
            _step(trainer)
            recovery_s = time.monotonic() - killed
            reload_s = manager.get(job_id).model_load_s
            service.close()
            manager.delete(job_id)
            rows.append((startup_s, load_s, recovery_s, reload_s))
            print(
                f"rep {rep}: startup {startup_s:6.2f} s (model load {load_s:5.2f} s, x{startup_s / load_s:4.2f})  "
                f"recovery {recovery_s:6.2f} s (model load {reload_s:5.2f} s, x{recovery_s / reload_s:4.2f})",
                flush=True,
            )
    finally:
        server.stop()
    startup = statistics.median(r[0] / r[1] for r in rows)
    recovery = statistics.median(r[2] / r[3] for r in rows)
    print(
        f"median ratio to the trainer's model-load time: startup x{startup:.2f}, recovery x{recovery:.2f} "
        f"(target <= 1.5)"
    )


if __name__ == "__main__":
    main()
