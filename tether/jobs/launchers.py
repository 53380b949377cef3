"""Launchers: how a trainer job's process (group) is started, watched and stopped.

One interface, chosen by the server's `job_launcher` setting:
- `local` (`LocalLauncher`): a subprocess of the control plane in its own process group; a job that
  asks for more than one rank runs under torchrun (`python -m torch.distributed.run --standalone
  --nproc-per-node N -m tether.jobs.runner SPEC`), one machine only.
- `ray` (`RayLauncher`, tether/jobs/ray_launcher.py): the same command started by a Ray actor
  placed on the cluster (`launcher_options` num_cpus / num_gpus / node_ip), so jobs spread over
  the machines of an existing Ray cluster.

A launcher only starts and signals processes; the job's state lives in the catalogue
(tether/jobs/manager.py), and the job process reports readiness through its ready file
(tether/jobs/runner.py). A launcher refuses what it cannot place (`check`) before anything starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from tether.types.errors import UserInputError
from tether.types.wire_jobs import TrainerJobConfig

RUNNER_MODULE = "tether.jobs.runner"


class LaunchError(Exception):
    """The launcher could not start the job; the message is recorded as the job's failure."""


@dataclass
class LaunchSpec:
    """What to start for one job."""

    job_id: str
    spec_file: Path
    """The `JobProcessSpec` JSON the runner reads."""
    log_path: Path
    """stdout and stderr of the job's processes (appended across launches)."""
    env: dict[str, str]
    """Added to the launcher's environment (the job's API key, PYTHONPATH)."""
    nproc_per_node: int = 1
    node_count: int = 1
    options: dict[str, str] = field(default_factory=dict)


def job_command(spec: LaunchSpec, python: str = sys.executable) -> list[str]:
    """The argv of a job: the runner, under torchrun when it asks for more than one rank."""
    if spec.nproc_per_node > 1 or spec.node_count > 1:
        return [
            python,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes",
            str(spec.node_count),
            "--nproc-per-node",
            str(spec.nproc_per_node),
            "-m",
            RUNNER_MODULE,
            str(spec.spec_file),
        ]
    return [python, "-m", RUNNER_MODULE, str(spec.spec_file)]


class JobHandle(ABC):
    """A started job's process (group)."""

    @abstractmethod
    def poll(self) -> int | None:
        """None while it runs; its exit code once it has ended (negative: killed by that signal;
        -1 also when the machine or the actor holding it is lost)."""

    @abstractmethod
    def signal(self, signum: int) -> None:
        """Send `signum` to every process of the job (gone already is fine)."""

    @property
    @abstractmethod
    def pid(self) -> int | None:
        """The job's leading process id (on its machine)."""

    def kill(self) -> None:
        """SIGKILL at once (what a preemption or an OOM looks like)."""
        self.signal(signal.SIGKILL)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not ended within `timeout_s`; waits for the end."""
        import time

        if self.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.poll() is not None:
                return
            time.sleep(0.05)
        self.kill()
        deadline = time.monotonic() + 5.0
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)


class Launcher(ABC):
    name: str

    def check(self, config: TrainerJobConfig) -> None:
        """Raise UserInputError naming the field of a request this launcher can never place."""
        if config.node_count > 1:
            raise UserInputError(
                f"this control plane's {self.name} launcher places a job on one machine; "
                f"node_count {config.node_count} needs the distributed trainer",
                field="node_count",
            )

    @abstractmethod
    def launch(self, spec: LaunchSpec) -> JobHandle:
        """Start the job; LaunchError with the launcher's error text if it cannot."""

    def close(self) -> None:  # noqa: B027 - most launchers hold nothing to release
        """Release the launcher's own resources (jobs are stopped by their handles)."""


class _LocalHandle(JobHandle):
    def __init__(self, process: subprocess.Popen) -> None:
        self._process = process

    def poll(self) -> int | None:
        return self._process.poll()

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self._process.pid, signum)  # the whole group: torchrun and its ranks
        except (ProcessLookupError, PermissionError):
            pass

    @property
    def pid(self) -> int:
        return self._process.pid


class LocalLauncher(Launcher):
    """Jobs as subprocesses of the control plane (each in its own session and process group)."""

    name = "local"

    def __init__(self, *, max_ranks: int | None = None) -> None:
        self.max_ranks = max_ranks if max_ranks is not None else max(1, os.cpu_count() or 1)

    def check(self, config: TrainerJobConfig) -> None:
        super().check(config)
        if config.nproc_per_node > self.max_ranks:
            raise UserInputError(
                f"asks for {config.nproc_per_node} ranks; this machine offers at most {self.max_ranks}",
                field="nproc_per_node",
            )

    def launch(self, spec: LaunchSpec) -> JobHandle:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **spec.env}
        try:
            with open(spec.log_path, "ab") as log:
                process = subprocess.Popen(
                    job_command(spec),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
        except OSError as exc:
            raise LaunchError(f"cannot start {job_command(spec)[0]}: {exc}") from exc
        return _LocalHandle(process)


def make_launcher(kind: str, *, ray_address: str | None = None, max_ranks: int | None = None) -> Launcher:
    """The launcher a server's settings name (`local` | `ray`)."""
    if kind == "local":
        return LocalLauncher(max_ranks=max_ranks)
    if kind == "ray":
        from tether.jobs.ray_launcher import RayLauncher

        return RayLauncher(address=ray_address)
    raise ValueError(f"unknown job launcher {kind!r} (local | ray)")
