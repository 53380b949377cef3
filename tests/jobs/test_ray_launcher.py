"""The ray launcher against a private single-node Ray cluster on 127.0.0.1: a job placed by a Ray
actor becomes ready, is relaunched after its process is killed, and is gone after delete."""

from __future__ import annotations

import os
import time

import pytest

from tether.client.jobs import TrainerJobConfig, TrainerJobManager
from tether.server.auth import owner_of_key
from tether.server.main import ServerThread
from tether.server.routes_jobs import job_manager
from tether.types.errors import UserInputError
from tether.types.wire_jobs import JobState

from .conftest import ALICE, BASE, control_plane_config

# Ray's single-machine mode: every address is the loopback one (read when ray is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="the ray launcher needs the ray extra")


@pytest.fixture()
def ray_control_plane(tmp_path, default_model_dir, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    server = ServerThread(control_plane_config(tmp_path, job_launcher="ray"))
    url = server.start()
    try:
        yield url, server.app
    finally:
        server.stop()
        assert not ray.is_initialized()  # the launcher shut down the cluster it started


def test_ray_launcher_places_relaunches_and_stops_a_job(ray_control_plane):
    url, app = ray_control_plane
    manager = TrainerJobManager(url, ALICE)
    config = TrainerJobConfig(base_model=BASE, requested_job_id="ray-1", launcher_options={"num_cpus": "1"})
    manager.create_and_wait(config, poll_interval_s=0.2, timeout_s=240)
    jobs = job_manager(app)
    owner = owner_of_key(ALICE)
    handle = jobs.handle(owner, "ray-1")
    assert handle.node_id == ray.get_runtime_context().get_node_id()  # placed by a Ray actor on the head node
    assert [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]] == ["127.0.0.1"]  # loopback only
    assert manager.get("ray-1").launcher == "ray"

    handle.kill()  # the job's process dies: the control plane notices and relaunches it through Ray
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        job = manager.get("ray-1")
        if job.state is JobState.RUNNING and job.restart_count == 1:
            break
        time.sleep(0.2)
    assert job.state is JobState.RUNNING and job.restart_count == 1, job
    assert jobs.handle(owner, "ray-1") is not handle

    relaunched = jobs.handle(owner, "ray-1")
    manager.delete("ray-1")
    assert relaunched.poll() is not None  # stopped: nothing left running

    with pytest.raises(Exception, match="launcher_options"):
        manager.create(TrainerJobConfig(base_model=BASE, launcher_options={"gpus": "1"}))


@pytest.mark.slow
def test_ray_places_one_process_group_per_node_and_trains_like_one_rank(ray_control_plane):
    """A node_count=2 job: two Ray actors (one per node, a placement group) each run torchrun; they
    meet by c10d rendezvous and train to the weights of a 1-rank job placed by the same launcher."""
    from .test_multi_rank_jobs import _assert_same, _train

    url, app = ray_control_plane
    seen = {}

    def look(step):
        seen["handle"] = job_manager(app).handle(owner_of_key(ALICE), "ray-2n")

    one = _train(url, app, "ray-1n", launcher_options={"num_cpus": "1"})
    two = _train(url, app, "ray-2n", kill=look, node_count=2, launcher_options={"num_cpus": "1"})
    handle = seen["handle"]
    assert len(handle.pids) == 2 and len(handle.node_ids) == 2  # one actor (process group) per node
    assert handle.poll() is not None  # deleted: the whole group is gone
    _assert_same(two, one)


def test_ray_refuses_what_the_cluster_cannot_hold(ray_control_plane):
    url, app = ray_control_plane
    manager = TrainerJobManager(url, ALICE)
    assert job_manager(app).launcher.name == "ray"  # connected to (here: started) its cluster
    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(UserInputError, match="launcher_options.num_cpus"):
        manager.create(
            TrainerJobConfig(base_model=BASE, node_count=2, launcher_options={"num_cpus": str(cpus)})
        )
    with pytest.raises(UserInputError, match="node_count"):
        manager.create(TrainerJobConfig(base_model=BASE, node_count=int(cpus) + 1))
    with pytest.raises(UserInputError, match="launcher_options.node_ip"):
        manager.create(
            TrainerJobConfig(base_model=BASE, node_count=2, launcher_options={"node_ip": "127.0.0.1"})
        )
