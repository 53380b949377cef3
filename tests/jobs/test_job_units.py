"""Trainer jobs without a model: config parsing, id rules, the torchrun command, launcher refusals,
idempotent rows, launcher failures, a dead multi-rank job, and relaunch after a control-plane restart."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tether.jobs.launchers import JobHandle, Launcher, LaunchError, LaunchSpec, LocalLauncher, job_command
from tether.jobs.manager import JobManager
from tether.jobs.store import JobStore
from tether.server.catalogue import Catalogue
from tether.types.errors import UserInputError
from tether.types.wire import parse_wire
from tether.types.wire_jobs import JobState, TrainerJobConfig

from .conftest import BASE, control_plane_config


def test_config_durations_ids_and_bounds():
    assert TrainerJobConfig(base_model=BASE, inactivity_timeout="1800s").inactivity_timeout == 1800.0
    assert (
        TrainerJobConfig(base_model=BASE, inactivity_timeout=timedelta(minutes=2)).inactivity_timeout == 120.0
    )
    for bad, field in [
        ({"inactivity_timeout": "4h"}, "inactivity_timeout"),
        ({"inactivity_timeout": 3 * 3600 + 1}, "inactivity_timeout"),
        ({"requested_job_id": "-x"}, "requested_job_id"),
        ({"requested_job_id": "a" * 64}, "requested_job_id"),
        ({"nproc_per_node": 0}, "nproc_per_node"),
        ({"display_name": "n" * 64}, "display_name"),
    ]:
        with pytest.raises(UserInputError) as info:
            parse_wire(TrainerJobConfig, {"base_model": BASE, **bad})
        assert info.value.field == field
    assert (
        JobState.parse("running") is JobState.RUNNING
        and JobState.parse("JOB_STATE_DELETED").short == "DELETED"
    )


def test_more_than_one_rank_runs_under_torchrun(tmp_path):
    spec = LaunchSpec(
        job_id="j", spec_file=tmp_path / "spec.json", log_path=tmp_path / "log", env={}, nproc_per_node=4
    )
    argv = job_command(spec, python="py")
    assert argv[:3] == ["py", "-m", "torch.distributed.run"] and argv[-3:] == [
        "-m",
        "tether.jobs.runner",
        str(spec.spec_file),
    ]
    assert argv[argv.index("--nproc-per-node") + 1] == "4"
    assert job_command(LaunchSpec("j", tmp_path / "s", tmp_path / "l", {}), python="py") == [
        "py",
        "-m",
        "tether.jobs.runner",
        str(tmp_path / "s"),
    ]
    with pytest.raises(UserInputError, match="nproc_per_node"):
        LocalLauncher(max_ranks=2).check(TrainerJobConfig(base_model=BASE, nproc_per_node=3))


def test_rows_are_claimed_once_per_owner_and_id(tmp_path):
    store = JobStore(Catalogue(tmp_path / "tether.db"))
    config = TrainerJobConfig(base_model=BASE)
    assert store.insert("alice", "j1", config, "local") is None
    again = store.insert("alice", "j1", config.model_copy(update={"lora_rank": 3}), "local")
    assert again is not None and again.job_config.lora_rank == 0  # the first claim stands
    assert store.insert("bob", "j1", config, "local") is None  # each owner has its own ids
    assert store.update("alice", "j1", expect={JobState.RUNNING}, state=JobState.FAILED) is False
    assert store.get("alice", "j1").job_state is JobState.CREATING


class _Handle(JobHandle):
    def __init__(self) -> None:
        self.signals: list[int] = []

    def poll(self):
        return -9 if self.signals else None

    def signal(self, signum):
        self.signals.append(signum)

    @property
    def pid(self):
        return None


class _Launcher(Launcher):
    name = "fake"

    def __init__(self, error: str | None = None) -> None:
        self.error = error
        self.launched: list[LaunchSpec] = []

    def launch(self, spec):
        if self.error:
            raise LaunchError(self.error)
        self.launched.append(spec)
        return _Handle()


def test_a_launcher_failure_fails_the_job_with_its_text(tmp_path):
    manager = JobManager(
        Catalogue(tmp_path / "tether.db"),
        control_plane_config(tmp_path),
        launcher=_Launcher("no capacity: 0 of 8 GPUs free"),
    )
    row = manager.create("alice", TrainerJobConfig(base_model=BASE, requested_job_id="j1"))
    assert row.job_state is JobState.FAILED and "no capacity: 0 of 8 GPUs free" in row.reason
    assert manager.handle("alice", "j1") is None
    manager.close()


def test_a_restarted_control_plane_relaunches_live_jobs(tmp_path):
    catalogue = Catalogue(tmp_path / "tether.db")
    first = _Launcher()
    JobManager(catalogue, control_plane_config(tmp_path), launcher=first).create(
        "alice", TrainerJobConfig(base_model=BASE, requested_job_id="j1")
    )
    assert len(first.launched) == 1
    second = _Launcher()
    manager = JobManager(catalogue, control_plane_config(tmp_path), launcher=second)
    manager.tick()
    assert len(second.launched) == 1 and "restarted" in manager.get("alice", "j1").reason
    manager.delete("alice", "j1")
    assert manager.get("alice", "j1").job_state is JobState.DELETED


def test_the_nodes_of_a_job_end_together(tmp_path):
    """A job of two nodes (two process groups): when one ends, the handle kills the other and reports
    the failing exit code, so the control plane relaunches the whole job."""
    import subprocess

    from tether.jobs.launchers import _LocalHandle

    nodes = [
        subprocess.Popen(["sleep", "120"], start_new_session=True),
        subprocess.Popen(["sh", "-c", "exit 3"], start_new_session=True),
    ]
    handle = _LocalHandle(nodes)
    nodes[1].wait(timeout=30)
    assert handle.poll() == 3 and handle.pids == [n.pid for n in nodes]
    assert nodes[0].wait(timeout=30) == -9
    spec = LaunchSpec("j", tmp_path / "s", tmp_path / "l", {}, nproc_per_node=2, node_count=2)
    argv = job_command(spec, python="py", rendezvous="127.0.0.1:29400")
    assert (
        argv[argv.index("--nnodes") + 1] == "2"
        and argv[argv.index("--rdzv-endpoint") + 1] == "127.0.0.1:29400"
    )
    with pytest.raises(ValueError, match="rendezvous"):
        job_command(spec, python="py")
    with pytest.raises(UserInputError, match="node_count"):
        LocalLauncher(max_ranks=2).check(TrainerJobConfig(base_model=BASE, nproc_per_node=2, node_count=2))


def test_readiness_and_deaths_wake_the_monitor_and_held_gets(tmp_path):
    """With a 60 s poll interval nothing would move for a minute: the watcher wakes the monitor when
    the ready file appears (and when a local process ends), and a held GET answers once it moves."""
    import http.server
    import json
    import threading

    class Healthz(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(200 if self.path == "/api/v1/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    launcher = _Launcher()
    manager = JobManager(
        Catalogue(tmp_path / "tether.db"),
        control_plane_config(tmp_path, job_poll_interval_s=60),
        launcher=launcher,
    )
    try:
        manager.create("alice", TrainerJobConfig(base_model=BASE, requested_job_id="j1"))
        held: list = []
        getter = threading.Thread(
            target=lambda: held.append(manager.wait_for_change("alice", "j1", JobState.PENDING, 30))
        )
        getter.start()
        woke = threading.Event()
        threading.Thread(target=lambda: (manager.wait_wake(60), woke.set()), daemon=True).start()
        ready = manager.job_dir("alice", "j1") / "ready.json"
        ready.write_text(
            json.dumps({"url": f"http://127.0.0.1:{httpd.server_address[1]}", "model_load_s": 1.0})
        )
        assert woke.wait(20)  # long before the poll interval
        manager.tick()
        getter.join(20)
        assert held and held[0].job_state is JobState.RUNNING

        handle = manager.handle("alice", "j1")
        handle.cheap_poll = True  # a local process: the watcher polls it
        woke.clear()
        threading.Thread(target=lambda: (manager.wait_wake(60), woke.set()), daemon=True).start()
        handle.signal(9)  # it ends
        assert woke.wait(20)
        manager.tick()
        assert manager.get("alice", "j1").restart_count == 1 and len(launcher.launched) == 2
    finally:
        manager.close()
        httpd.shutdown()
