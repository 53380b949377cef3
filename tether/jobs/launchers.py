"""Launchers: how a trainer job's process (group) is started, watched and stopped.

One interface, chosen by the server's `job_launcher` setting:
- `local` (`LocalLauncher`): a subprocess of the control plane in its own process group; a job that
  asks for more than one rank runs under torchrun (`python -m torch.distributed.run --standalone
  --nproc-per-node N -m tether.jobs.runner SPEC`); a job of `node_count` M > 1 runs M torchrun
  invocations ("nodes") on this machine that meet by c10d rendezvous on 127.0.0.1.
- `ray` (`RayLauncher`, tether/jobs/ray_launcher.py): the same command(s) started by Ray actors,
  one per node of the job, placed on the cluster (`launcher_options` num_cpus / num_gpus / node_ip),
  so jobs spread over the machines of an existing Ray cluster.

A job's processes live and die together: when any node's torchrun (or a lone runner) exits, the
handle stops the others, so the control plane relaunches the whole group (torchrun itself stops a
node's ranks when one of them dies).

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


def job_command(
    spec: LaunchSpec, python: str = sys.executable, *, rendezvous: str | None = None
) -> list[str]:
    """The argv of (one node of) a job: the runner, under torchrun when it asks for more than one rank.

    A job of more than one node needs `rendezvous` ("host:port" where node 0's c10d store listens);
    every node runs the same command."""
    runner = ["-m", RUNNER_MODULE, str(spec.spec_file)]
    if spec.node_count > 1:
        if rendezvous is None:
            raise ValueError("a job of more than one node needs a rendezvous address")
        return [
            python,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(spec.node_count),
            "--nproc-per-node",
            str(spec.nproc_per_node),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            rendezvous,
            "--rdzv-id",
            f"tether-{spec.job_id}",
            "--max-restarts",
            "0",
            *runner,
        ]
    if spec.nproc_per_node > 1:
        return [
            python,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(spec.nproc_per_node),
            "--max-restarts",
            "0",
            *runner,
        ]
    return [python, *runner]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (for a job's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class JobHandle(ABC):
    """A started job's process (group)."""

    cheap_poll = False
    """Whether `poll` is a local system call (the control plane's watcher then polls it often)."""

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

    def check(self, config: TrainerJobConfig) -> None:  # noqa: B027 - most launchers accept anything
        """Raise UserInputError naming the field of a request this launcher can never place."""

    @abstractmethod
    def launch(self, spec: LaunchSpec) -> JobHandle:
        """Start the job; LaunchError with the launcher's error text if it cannot."""

    def close(self) -> None:  # noqa: B027 - most launchers hold nothing to release
        """Release the launcher's own resources (jobs are stopped by their handles)."""


class _LocalHandle(JobHandle):
    """The processes of a job's nodes (one each), every one leading its own process group."""

    cheap_poll = True

    def __init__(self, processes: list[subprocess.Popen]) -> None:
        self._processes = processes

    def poll(self) -> int | None:
        codes = [p.poll() for p in self._processes]
        ended = [c for c in codes if c is not None]
        if not ended:
            return None
        if len(ended) < len(codes):  # one node is gone: the rest cannot go on without it
            self.signal(signal.SIGKILL)
        return next((c for c in ended if c != 0), ended[0])

    def signal(self, signum: int) -> None:
        for process in self._processes:
            try:
                os.killpg(process.pid, signum)  # the whole group: torchrun and its ranks
            except (ProcessLookupError, PermissionError):
                pass

    @property
    def pid(self) -> int:
        return self._processes[0].pid

    @property
    def pids(self) -> list[int]:
        """The leading process of each node."""
        return [p.pid for p in self._processes]


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
        total = config.nproc_per_node * config.node_count
        if total > self.max_ranks:  # every "node" of a local job is this machine
            raise UserInputError(
                f"{config.node_count} nodes x {config.nproc_per_node} ranks = {total} ranks; the local "
                f"launcher runs every node on this machine, which offers at most {self.max_ranks}",
                field="node_count",
            )

    def launch(self, spec: LaunchSpec) -> JobHandle:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **spec.env}
        rendezvous = f"127.0.0.1:{free_port()}" if spec.node_count > 1 else None
        command = job_command(spec, rendezvous=rendezvous)
        processes: list[subprocess.Popen] = []
        try:
            with open(spec.log_path, "ab") as log:
                for _ in range(spec.node_count):
                    processes.append(
                        subprocess.Popen(
                            command,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env=env,
                            stdin=subprocess.DEVNULL,
                            start_new_session=True,
                        )
                    )
        except OSError as exc:
            _LocalHandle(processes).signal(signal.SIGKILL)
            raise LaunchError(f"cannot start {command[0]}: {exc}") from exc
        return _LocalHandle(processes)


def make_launcher(kind: str, *, ray_address: str | None = None, max_ranks: int | None = None) -> Launcher:
    """The launcher a server's settings name (`local` | `ray`)."""
    if kind == "local":
        return LocalLauncher(max_ranks=max_ranks)
    if kind == "ray":
        from tether.jobs.ray_launcher import RayLauncher

        return RayLauncher(address=ray_address)
    raise ValueError(f"unknown job launcher {kind!r} (local | ray)")
