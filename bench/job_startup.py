"""How long a dedicated trainer job takes to become useful, next to its trainer's own model-load time.

Against a control plane (`tether serve` in a thread, local launcher), for each of `--reps` jobs:
1. startup:  `TrainerJobManager.create_and_wait` -> first completed training step (create the training
             client through the control plane, forward_backward, optim_step), wall time;
2. recovery: SIGKILL the job's process after a `save_state` -> the control plane relaunches it ->
             `ReconnectingTrainingClient`-style reconnect (`reconnect_and_wait`, restore the save with
             optimizer) -> first completed step again, wall time;
each printed beside the model-load time the job's trainer measured itself (`model_load_s`, from the
same launch), as a ratio. Target: both <= 1.5 x the model-load time. The difference is process
start-up (Python + torch imports), readiness polling, and the client's own requests; each rep also
prints where the time went, from the job's ready-file timeline (tether/jobs/runner.py):

    spawn   launcher -> the runner's first line (interpreter start, light imports)
    server  importing the server stack (FastAPI, SQLAlchemy, routes)
    app     building the app (catalogue, migrations)
    listen  uvicorn start-up and lifespan
    load    the trainer's model load (the reported model_load_s: its torch/engine imports and the
            model, as the server's warm-up does them once it listens)
    after   the later of listening and loaded -> ready file written
    notice  ready file written -> the client has a ready endpoint (control plane + client waits)
    step    create the training client (or restore the save) + the first step

`--torch-threads` is the control plane's (and so the job's) `torch_threads`; unset, torch uses one
thread per core, which on a CPU shared with other work makes every step wait on busy cores.

    PYTHONPATH=. python bench/job_startup.py [--model tether/tiny-qwen3] [--reps 2] [--poll 0.2]
"""

from __future__ import annotations

import argparse
import json
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


PHASES = ("launch", "start", "imports", "app", "listening")
NAMES = ("spawn", "server", "app", "listen")


def _breakdown(timeline: dict[str, float], ready_at: float, done_at: float) -> str:
    """The phases of one launch, in seconds (see the module docstring)."""
    points = [timeline[p] for p in PHASES]
    parts = [f"{name} {b - a:5.2f}" for name, a, b in zip(NAMES, points, points[1:], strict=False)]
    load_start = timeline.get("load_start", timeline["listening"])
    parts.append(f"load {timeline['loaded'] - load_start:5.2f}")
    parts.append(f"after {timeline['ready'] - max(timeline['listening'], timeline['loaded']):5.2f}")
    parts.append(f"notice {ready_at - timeline['ready']:5.2f}")
    parts.append(f"step {done_at - ready_at:5.2f}")
    return "  ".join(parts)


def _timeline(server_jobs, job_id: str) -> dict[str, float]:
    ready = json.loads((server_jobs.job_dir(owner_of_key(KEY), job_id) / "ready.json").read_text())
    return ready["timeline"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tether/tiny-qwen3")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--poll", type=float, default=0.2, help="control plane and client poll interval (s)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the training client")
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch threads of the job (unset: all)"
    )
    args = parser.parse_args()

    config = ServerConfig(
        port=0,
        data_dir=tempfile.mkdtemp(prefix="tether-bench-jobs-"),
        api_keys=[KEY],
        models=[args.model],
        job_poll_interval_s=args.poll,
        torch_threads=args.torch_threads,
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
            started = time.time()
            endpoint = manager.create_and_wait(
                TrainerJobConfig(base_model=args.model, requested_job_id=job_id),
                poll_interval_s=args.poll,
                timeout_s=600,
            )
            ready_at = time.time()
            timeline = _timeline(server_jobs, job_id)
            service = ServiceClient(base_url=endpoint.base_url, api_key=KEY)
            trainer = service.create_lora_training_client(args.model, rank=args.rank, seed=0).result()
            _step(trainer)
            done_at = time.time()
            startup_s = done_at - started
            load_s = manager.get(job_id).model_load_s
            path = trainer.save_state("bench").result().path
            service.close()
            start_parts = f"create {timeline['launch'] - started:5.2f}  " + _breakdown(
                timeline, ready_at, done_at
            )

            killed = time.time()
            server_jobs.handle(owner_of_key(KEY), job_id).kill()
            _wait_relaunched(manager, job_id, args.poll)
            endpoint = manager.reconnect_and_wait(job_id, poll_interval_s=args.poll, timeout_s=600)
            ready_at = time.time()
            timeline = _timeline(server_jobs, job_id)
            service = ServiceClient(base_url=endpoint.base_url, api_key=KEY)
            trainer = service.create_training_client_from_state_with_optimizer(path).result()
            _step(trainer)
            done_at = time.time()
            recovery_s = done_at - killed
            reload_s = manager.get(job_id).model_load_s
            service.close()
            manager.delete(job_id)
            recover_parts = f"notice-death {timeline['launch'] - killed:5.2f}  " + _breakdown(
                timeline, ready_at, done_at
            )
            rows.append((startup_s, load_s, recovery_s, reload_s))
            print(
                f"rep {rep}: startup {startup_s:6.2f} s (model load {load_s:5.2f} s, x{startup_s / load_s:4.2f})  "
                f"recovery {recovery_s:6.2f} s (model load {reload_s:5.2f} s, x{recovery_s / reload_s:4.2f})\n"
                f"  startup:  {start_parts}\n  recovery: {recover_parts}",
                flush=True,
            )
    finally:
        server.stop()
    startup = statistics.median(r[0] / r[1] for r in rows)
    recovery = statistics.median(r[2] / r[3] for r in rows)
    print(
        f"median ratio to the trainer's model-load time: startup x{startup:.2f}, recovery x{recovery:.2f} "
        f"(target <= 1.5); median seconds: startup {statistics.median(r[0] for r in rows):.2f}, "
        f"recovery {statistics.median(r[2] for r in rows):.2f}, model load "
        f"{statistics.median(r[1] for r in rows + [(0, r[3]) for r in rows]):.2f}"
    )


if __name__ == "__main__":
    main()
