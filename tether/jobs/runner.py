"""The process of one trainer job: a `tether serve` for one base model that loads it before it says ready.

`python -m tether.jobs.runner SPEC.json` (what every launcher starts) runs the full Tinker protocol
for the spec's base model, like `tether serve --models <base>`, on a free port. It loads the base
model into its trainer first, then writes `{"url", "model_load_s", "pid", "timeline"}` atomically
to the spec's ready file: a job whose ready file exists can train at once. `timeline` holds the
wall-clock times of its start-up phases (launch, start, imports, app, listening, loaded, ready) for
`bench/job_startup.py`. Its API key comes in the environment
(`TETHER_JOB_API_KEY`, never on the command line or in the spec): the control plane holds it and
swaps it in when it forwards a user's request, so only the control plane can reach the job.

The job's data directory (its own catalogue `tether.db` and `checkpoints/`) is the spec's
`server.data_dir`; it outlives the process, so a relaunch finds its checkpoints and the control
plane can list them after the job is gone. The process exits when the process that started it
goes away (it is re-parented), so a dead launcher leaves nothing running.

Multi-rank jobs run under torchrun (one invocation per node, tether/jobs/launchers.py): every rank
joins the process group (tether/trainer/distributed.py); rank 0 serves HTTP with a
`DistributedTrainer` that broadcasts each training op to the other ranks, which follow until rank 0
stops. Only rank 0 writes the ready file. A rank that dies takes its node's torchrun down, and the
launcher's handle the job's other nodes, so the control plane relaunches the whole group.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, Field

from tether.server.config import ServerConfig

STARTED_AT = time.time()
"""When this process had its own light imports done (the timeline's `start`, wall clock)."""

log = logging.getLogger("tether.jobs")

API_KEY_ENV = "TETHER_JOB_API_KEY"
LAUNCHED_AT_ENV = "TETHER_JOB_LAUNCHED_AT"
"""Wall-clock time the launcher started the job (the first entry of the ready file's timeline)."""


class JobProcessSpec(BaseModel):
    """What a launcher hands the job process (written as JSON next to the job's log)."""

    job_id: str
    server: ServerConfig = Field(
        description="The job's server settings: one model, port 0, the job's data dir."
    )
    ready_file: Path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def error_file(ready_file: Path) -> Path:
    """Where a job process that cannot serve writes why (the control plane records it as the reason)."""
    return ready_file.with_name("error.txt")


def run(spec: JobProcessSpec) -> None:
    """Serve the job until SIGTERM/SIGINT or until its parent process is gone; a failure to start is
    written to `error_file` before the process exits."""
    try:
        _run(spec)
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt):
            message = str(exc) if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
            _write_atomic(error_file(spec.ready_file), message)
        raise


def _run(spec: JobProcessSpec) -> None:
    key = os.environ.pop(API_KEY_ENV, None)
    if not key:
        raise SystemExit(f"tether job: {API_KEY_ENV} is not set")
    config = spec.server.model_copy(update={"api_keys": [key], "ready_file": None})
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s",
    )
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        from tether.engine.fsdp_collectives import exit_process, leave_process_group
    trainer = _join_ranks(config) if distributed else None
    if distributed and trainer is None:
        exit_process(0)  # a rank > 0: it followed rank 0 until the stop and left the group
    ended_cleanly = False
    try:
        _serve(spec, config, trainer)
        ended_cleanly = True
    finally:
        if distributed:
            leave_process_group(together=ended_cleanly)
    if distributed:
        exit_process(0)


def _join_ranks(config: ServerConfig) -> Any:
    """Join torchrun's process group: rank 0 gets the `DistributedTrainer` its server adopts; the
    other ranks load the base model, run rank 0's ops until it stops, and get None."""
    import torch
    import torch.distributed as dist

    from tether.engine.fsdp_collectives import leave_process_group
    from tether.trainer.distributed import (
        ControlChannel,
        DistributedExecutor,
        DistributedTrainer,
        follow,
        init_distributed,
    )

    if len(config.models) != 1:
        raise SystemExit("tether job: a multi-rank job serves exactly one base model")
    settings = init_distributed(config.engine_settings())
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    channel = ControlChannel()
    if dist.get_rank() == 0:
        return DistributedTrainer(config.models[0], settings, channel)
    executor = DistributedExecutor(config.models[0], settings)
    ended_cleanly = False
    try:
        executor.base  # noqa: B018 - load now, beside rank 0, not on the first training op
        follow(executor, channel)
        ended_cleanly = True
    finally:
        executor.close()
        leave_process_group(together=ended_cleanly)
    return None


def _serve(spec: JobProcessSpec, config: ServerConfig, trainer: Any) -> None:
    timeline = {"start": STARTED_AT}
    launched = os.environ.pop(LAUNCHED_AT_ENV, None)
    if launched:
        timeline["launch"] = float(launched)
    from tether.server.main import _bound_url, _uvicorn_server

    timeline["imports"] = time.time()
    server = _uvicorn_server(config)
    cast(Any, server.config.app).state.tether_job_process = True  # it launches no jobs of its own
    timeline["app"] = time.time()
    if trainer is not None:
        cast(Any, server.config.app).state.tether.trainers.adopt(config.models[0], trainer)
    parent = os.getppid()

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if not server.started:
            await task
            return
        url = _bound_url(server, config.host)
        timeline["listening"] = time.time()
        state = cast(Any, server.config.app).state.tether
        started = time.monotonic()
        for name in config.models:  # load before saying ready: a ready job trains at once
            await asyncio.to_thread(state.trainers.base_info, name)
        load_s = time.monotonic() - started
        timeline["loaded"] = time.time()
        print(
            f"tether job {spec.job_id}: serving {config.models} on {url} (model load {load_s:.2f} s)",
            flush=True,
        )
        timeline["ready"] = time.time()
        ready = {"url": url, "model_load_s": load_s, "pid": os.getpid(), "timeline": timeline}
        _write_atomic(spec.ready_file, json.dumps(ready))
        while not task.done():
            if os.getppid() != parent:
                log.warning("tether job %s: its launcher is gone; stopping", spec.job_id)
                server.should_exit = True
            await asyncio.sleep(0.5)
        await task

    asyncio.run(main())


if __name__ == "__main__":
    run(JobProcessSpec.model_validate_json(Path(sys.argv[1]).read_text()))
