"""The `ray` launcher: each job's processes are started by a Ray actor placed on an existing cluster.

The actor (`JobHost`) reserves the job's resources on some node of the cluster (`launcher_options`:
`num_cpus`, default 1; `num_gpus`, default 0; `node_ip` pins a node), starts the job command there
in its own process group (with that node's Python) and answers `poll` and `signal`. When the actor
or its node is lost, `poll` reports the job as ended (-1), which the control plane treats like a
crash. The job's data directory must be reachable at the same path on every node (shared
storage); on one machine it trivially is.

`RayLauncher(address=None)` connects to `$RAY_ADDRESS` if set, else starts a private single-node
cluster bound to 127.0.0.1 for the life of the control plane; `address="auto"` or
`"<host>:<port>"` joins an existing head. Needs the `ray` extra (`pip install tether[ray]`).
"""

from __future__ import annotations

import os
import subprocess
from typing import Any, cast

from tether.jobs.launchers import JobHandle, Launcher, LaunchError, LaunchSpec, job_command
from tether.types.errors import ConfigurationError, UserInputError
from tether.types.wire_jobs import TrainerJobConfig

POLL_TIMEOUT_S = 10.0


class JobHost:
    """Runs on the node Ray picked: starts the job command and signals its process group."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None

    def start(self, spec: LaunchSpec) -> tuple[int, str]:
        import sys

        import ray

        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "ab") as log:
            self._process = subprocess.Popen(
                job_command(spec, python=sys.executable),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **spec.env},
                start_new_session=True,
            )
        return self._process.pid, ray.get_runtime_context().get_node_id()

    def poll(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def signal(self, signum: int) -> None:
        if self._process is None:
            return
        try:
            os.killpg(self._process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


class _RayHandle(JobHandle):
    def __init__(self, actor: Any, pid: int, node_id: str) -> None:
        self._actor = actor
        self._pid = pid
        self.node_id = node_id
        self._exit: int | None = None

    def poll(self) -> int | None:
        import ray

        if self._exit is not None:
            return self._exit
        try:
            code = ray.get(self._actor.poll.remote(), timeout=POLL_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            return None  # a slow answer is not a death
        except ray.exceptions.RayError:
            code = -1  # the actor or its node is gone: the job's processes went with it
        if code is not None:
            self._exit = code
            ray.kill(self._actor, no_restart=True)
        return code

    def signal(self, signum: int) -> None:
        import ray

        if self._exit is not None:
            return
        try:
            ray.get(self._actor.signal.remote(signum), timeout=POLL_TIMEOUT_S)
        except ray.exceptions.RayError:
            pass

    @property
    def pid(self) -> int:
        return self._pid


class RayLauncher(Launcher):
    name = "ray"

    def __init__(self, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ConfigurationError(
                "the ray launcher needs ray (pip install 'tether[ray]')", field="job_launcher"
            ) from exc
        self._owns_cluster = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            kwargs: dict[str, Any] = {
                "namespace": "tether-jobs",
                "log_to_driver": False,
                "ignore_reinit_error": True,
            }
            if address is None:
                kwargs.update(include_dashboard=False, _node_ip_address="127.0.0.1")
                self._owns_cluster = True
            ray.init(address=address, **kwargs)
        self._actor_class = ray.remote(max_restarts=0)(JobHost)

    def check(self, config: TrainerJobConfig) -> None:
        super().check(config)
        for key in ("num_cpus", "num_gpus"):
            if key in config.launcher_options:
                try:
                    float(config.launcher_options[key])
                except ValueError:
                    raise UserInputError(
                        f"{key} must be a number, got {config.launcher_options[key]!r}",
                        field=f"launcher_options.{key}",
                    ) from None
        unknown = set(config.launcher_options) - {"num_cpus", "num_gpus", "node_ip"}
        if unknown:
            raise UserInputError(
                f"unknown ray launcher option(s) {sorted(unknown)} (num_cpus, num_gpus, node_ip)",
                field="launcher_options",
            )

    def launch(self, spec: LaunchSpec) -> JobHandle:
        import ray

        options: dict[str, Any] = {
            "num_cpus": float(spec.options.get("num_cpus", 1)),
            "num_gpus": float(spec.options.get("num_gpus", 0)),
            "name": f"tether-job-{spec.job_id}-{os.urandom(3).hex()}",
        }
        if "node_ip" in spec.options:
            options["resources"] = {f"node:{spec.options['node_ip']}": 0.001}
        actor: Any = None
        try:
            actor = cast(Any, self._actor_class).options(**options).remote()
            pid, node_id = ray.get(actor.start.remote(spec), timeout=120)
        except Exception as exc:  # noqa: BLE001 - any placement or start failure is the launcher's error text
            if actor is not None:
                ray.kill(actor, no_restart=True)
            raise LaunchError(f"ray could not start the job: {type(exc).__name__}: {exc}") from exc
        return _RayHandle(actor, pid, node_id)

    def close(self) -> None:
        import ray

        if self._owns_cluster and ray.is_initialized():
            ray.shutdown()


__all__ = ["RayLauncher", "JobHost"]
