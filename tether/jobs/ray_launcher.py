"""The `ray` launcher: each job's processes are started by Ray actors placed on an existing cluster.

One actor (`JobHost`) per node of the job reserves that node's share of the job's resources
(`launcher_options`, per node: `num_cpus`, default `nproc_per_node`; `num_gpus`, default 0;
`node_ip` pins a one-node job to a node), starts the job command there in its own process group
(with that node's Python) and answers `poll` and `signal`. A job of `node_count` M > 1 reserves its
M bundles at once in a placement group (SPREAD: on different machines where the cluster has them),
and its nodes meet at a c10d rendezvous on the machine of the first. When any node's processes end,
or an actor or its machine is lost (`poll` -1), the handle stops the others, which the control plane
treats like a crash of the whole job. The job's data directory must be reachable at the same path
on every node (shared storage); on one machine it trivially is.

`RayLauncher(address=None)` connects to `$RAY_ADDRESS` if set, else starts a private single-node
cluster bound to 127.0.0.1 for the life of the control plane; `address="auto"` or
`"<host>:<port>"` joins an existing head. Needs the `ray` extra (`pip install tether[ray]`).
"""

from __future__ import annotations

import os
import signal
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

    def rendezvous(self) -> str:
        """`ip:port` free on this actor's machine, for the job's c10d rendezvous."""
        import ray

        from tether.jobs.launchers import free_port

        ip = ray.util.get_node_ip_address()
        return f"{ip}:{free_port(ip)}"

    def start(self, spec: LaunchSpec, rendezvous: str | None = None) -> tuple[int, str]:
        import sys

        import ray

        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "ab") as log:
            self._process = subprocess.Popen(
                job_command(spec, python=sys.executable, rendezvous=rendezvous),
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
    """The actors of a job's nodes (one each) and the placement group that holds their resources."""

    def __init__(
        self, actors: list[Any], pids: list[int], node_ids: list[str], placement_group: Any = None
    ) -> None:
        self._actors = actors
        self.pids = pids
        self.node_ids = node_ids
        self.node_id = node_ids[0]
        self._placement_group = placement_group
        self._exit: int | None = None

    def poll(self) -> int | None:
        import ray

        if self._exit is not None:
            return self._exit
        codes: list[int | None] = []
        for actor in self._actors:
            try:
                codes.append(ray.get(actor.poll.remote(), timeout=POLL_TIMEOUT_S))
            except ray.exceptions.GetTimeoutError:
                codes.append(None)  # a slow answer is not a death
            except ray.exceptions.RayError:
                codes.append(-1)  # the actor or its node is gone: its processes went with it
        ended = [c for c in codes if c is not None]
        if not ended:
            return None
        code = next((c for c in ended if c != 0), ended[0])
        self._release(signal.SIGKILL)  # the other nodes cannot go on without this one
        self._exit = code
        return code

    def _release(self, signum: int) -> None:
        import ray

        for actor in self._actors:
            try:
                ray.get(actor.signal.remote(signum), timeout=POLL_TIMEOUT_S)
            except ray.exceptions.RayError:
                pass
            ray.kill(actor, no_restart=True)
        if self._placement_group is not None:
            ray.util.remove_placement_group(self._placement_group)
            self._placement_group = None

    def signal(self, signum: int) -> None:
        import ray

        if self._exit is not None:
            return
        for actor in self._actors:
            try:
                ray.get(actor.signal.remote(signum), timeout=POLL_TIMEOUT_S)
            except ray.exceptions.RayError:
                pass

    @property
    def pid(self) -> int:
        return self.pids[0]


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
        import ray

        super().check(config)
        per_node = {}
        for key in ("num_cpus", "num_gpus"):
            if key in config.launcher_options:
                try:
                    per_node[key] = float(config.launcher_options[key])
                except ValueError:
                    raise UserInputError(
                        f"{key} must be a number, got {config.launcher_options[key]!r}",
                        field=f"launcher_options.{key}",
                    ) from None
                if per_node[key] < 0:
                    raise UserInputError(f"{key} must be >= 0", field=f"launcher_options.{key}")
        unknown = set(config.launcher_options) - {"num_cpus", "num_gpus", "node_ip"}
        if unknown:
            raise UserInputError(
                f"unknown ray launcher option(s) {sorted(unknown)} (num_cpus, num_gpus, node_ip)",
                field="launcher_options",
            )
        if "node_ip" in config.launcher_options and config.node_count > 1:
            raise UserInputError(
                "node_ip pins a job of one node; a job of several nodes is spread by Ray",
                field="launcher_options.node_ip",
            )
        total = ray.cluster_resources()
        for key, resource in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
            wanted = _per_node(config.launcher_options, config.nproc_per_node, key) * config.node_count
            if wanted > total.get(resource, 0.0):
                raise UserInputError(
                    f"{config.node_count} node(s) x {wanted / config.node_count:g} {resource} = {wanted:g} "
                    f"{resource}; this Ray cluster has {total.get(resource, 0.0):g}",
                    field=f"launcher_options.{key}" if key in config.launcher_options else "node_count",
                )

    def launch(self, spec: LaunchSpec) -> JobHandle:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cpus = _per_node(spec.options, spec.nproc_per_node, "num_cpus")
        gpus = _per_node(spec.options, spec.nproc_per_node, "num_gpus")
        name = f"tether-job-{spec.job_id}-{os.urandom(3).hex()}"
        actors: list[Any] = []
        group: Any = None
        try:
            options: list[dict[str, Any]] = []
            if spec.node_count > 1:
                bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
                group = ray.util.placement_group([bundle] * spec.node_count, strategy="SPREAD", name=name)
                ray.get(group.ready(), timeout=120)
                for index in range(spec.node_count):
                    strategy = PlacementGroupSchedulingStrategy(
                        placement_group=group, placement_group_bundle_index=index
                    )
                    options.append({"num_cpus": cpus, "num_gpus": gpus, "scheduling_strategy": strategy})
            else:
                single: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
                if "node_ip" in spec.options:
                    single["resources"] = {f"node:{spec.options['node_ip']}": 0.001}
                options.append(single)
            for index, option in enumerate(options):
                actors.append(cast(Any, self._actor_class).options(name=f"{name}-{index}", **option).remote())
            rendezvous = ray.get(actors[0].rendezvous.remote(), timeout=120) if spec.node_count > 1 else None
            started = ray.get([a.start.remote(spec, rendezvous) for a in actors], timeout=120)
        except Exception as exc:  # noqa: BLE001 - any placement or start failure is the launcher's error text
            handle = _RayHandle(actors, [], [""], group)
            handle._release(signal.SIGKILL)
            raise LaunchError(f"ray could not start the job: {type(exc).__name__}: {exc}") from exc
        return _RayHandle(actors, [pid for pid, _ in started], [node for _, node in started], group)

    def close(self) -> None:
        import ray

        if self._owns_cluster and ray.is_initialized():
            ray.shutdown()


def _per_node(options: dict[str, str], nproc_per_node: int, key: str) -> float:
    """A node's share of the job: `launcher_options[key]`, else one CPU per rank and no GPU."""
    if key in options:
        return float(options[key])
    return float(nproc_per_node) if key == "num_cpus" else 0.0


__all__ = ["RayLauncher", "JobHost"]
