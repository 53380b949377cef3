"""The control plane when a deployment's serving process dies mid-hot-load, mid-request or
mid-stream, when a client aims the proxy at a route it must not reach, and while a deletion
waits for a process to stop.

The serving process here is `dying_deployment.py`, which kills itself at an exact point of a
request (the real process's restart on its last good weights is in test_control_plane.py).
Expected: a 4xx naming the cause or a stream ending in an error event, never a 500 or a hang, and
the deployment FAILED with the cause until `restart`.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tether.client.deployments import DeploymentConfig, DeploymentManager
from tether.server.deployments import DeploymentRegistry
from tether.types.errors import ConflictError, ServerError
from tether.types.paths import parse_checkpoint_path

KEY = "tml-test"
DYING = Path(__file__).with_name("dying_deployment.py")
CHECKPOINT = "tinker://sess-1:train:0/sampler_weights/step-0"


@pytest.fixture
def deployment(thread, model_dir, monkeypatch):
    """A READY deployment whose serving process is the dying stand-in."""
    monkeypatch.setattr(
        DeploymentRegistry,
        "_command",
        lambda self, deployment_id, base_model, transition, port, state_dir: [
            sys.executable,
            str(DYING),
            str(port),
        ],
    )
    manager = DeploymentManager(thread.base_url, KEY)
    manager.create_or_get(DeploymentConfig(deployment_id="dying", base_model=str(model_dir)))
    manager.wait_for_ready("dying", timeout_s=120)
    yield manager
    manager.delete("dying")
    manager.close()


def failed_with_cause(manager: DeploymentManager) -> str:
    info = manager.get("dying")
    assert info is not None and info.state == "FAILED" and "exited with code -9" in (info.error or ""), info
    return info.error or ""


def test_the_proxy_reaches_only_the_deployments_public_routes(deployment):
    """`v1/%2e%2e/hot_load` is `v1/../hot_load` once decoded: it must not reach the deployment's
    unauthenticated /hot_load (which would load any directory on the machine, another key's
    checkpoints included)."""
    http = deployment._http
    for rest in ("%2e%2e/hot_load", "..%2Fhot_load", "models/%2e%2e/%2e%2e/status", "hot_load"):
        answer = http.post(f"/api/v1/tether/deployments/dying/v1/{rest}", json={"path": "/"})
        assert answer.status_code == 404, (rest, answer.text)
    assert deployment.get("dying").state == "READY"  # the stand-in dies if its /hot_load is reached


def test_a_process_dying_mid_request_is_a_409_naming_the_cause(deployment):
    answer = deployment._http.post(
        "/api/v1/tether/deployments/dying/v1/completions",
        json={"model": "dying", "prompt": [1], "max_tokens": 2},
    )
    assert answer.status_code == 409, answer.text
    assert "FAILED" in answer.json()["detail"] and "exited with code -9" in answer.json()["detail"]
    failed_with_cause(deployment)


def test_a_process_dying_mid_stream_ends_the_stream_with_an_error(thread, deployment):
    client = openai.OpenAI(
        api_key=KEY, base_url=f"{thread.base_url}/api/v1/tether/deployments/dying/v1", max_retries=0
    )
    stream = client.completions.create(model="dying", prompt=[1], max_tokens=8, stream=True)
    first = next(iter(stream))
    assert first.choices[0].text == "first"
    with pytest.raises(openai.APIError, match="stopped answering"):
        for _ in stream:
            pass
    failed_with_cause(deployment)


def test_a_process_dying_mid_hotload_fails_the_wait_and_restart_brings_it_back(thread, deployment):
    owner_dir = thread.app.state.tether.checkpoints.directory("local", parse_checkpoint_path(CHECKPOINT))
    owner_dir.mkdir(parents=True, exist_ok=True)
    (owner_dir / "manifest.json").write_text("{}")  # the stand-in reads nothing
    with pytest.raises(ConflictError, match="FAILED.*exited with code -9"):
        deployment.hotload("dying", "", CHECKPOINT)
    status = deployment.hotload_check_status("dying")
    assert status["state"] == "FAILED" and "exited with code -9" in status["error"]
    with pytest.raises(ServerError, match="FAILED"):  # at once, not after the timeout
        deployment.wait_for_hotload("dying", "", CHECKPOINT, timeout_seconds=600)
    assert "exited with code -9" in deployment.last_hotload_error_message
    deployment._call("POST", "/dying/restart")
    assert deployment.wait_for_ready("dying", timeout_s=120).state == "READY"


def test_stopping_a_process_does_not_hold_up_other_requests(thread, deployment, monkeypatch):
    """delete and restart wait for the process to stop (up to 30 s): off the event loop."""
    entered, release = threading.Event(), threading.Event()
    real_stop = DeploymentRegistry._stop

    def slow_stop(self, deployment_id):
        entered.set()
        release.wait(120)
        real_stop(self, deployment_id)

    monkeypatch.setattr(DeploymentRegistry, "_stop", slow_stop)
    deleting = threading.Thread(target=deployment.delete, args=("dying",))
    deleting.start()
    try:
        assert entered.wait(60)
        # answered while the deletion is still stopping the process
        answer = httpx.get(
            f"{thread.base_url}/api/v1/tether/deployments", headers={"X-API-Key": KEY}, timeout=60
        )
        assert answer.status_code == 200 and not release.is_set()
    finally:
        release.set()
        deleting.join(120)
    assert deployment.get("dying") is None


def test_restarting_a_deployment_that_is_still_starting_leaves_it_starting(thread, model_dir, monkeypatch):
    """The watcher of the stopped process must not mark the deployment's new process FAILED."""
    never_ready = [sys.executable, "-c", "import time; time.sleep(600)"]
    monkeypatch.setattr(DeploymentRegistry, "_command", lambda self, *args: never_ready)
    manager = DeploymentManager(thread.base_url, KEY)
    try:
        assert (
            manager.create_or_get(DeploymentConfig("starting", base_model=str(model_dir))).state == "CREATING"
        )
        watchers = [t for t in threading.enumerate() if t.name == "deployment-starting"]
        assert watchers
        manager._call("POST", "/starting/restart")
        for watcher in watchers:  # the first process's watcher has seen it exit
            watcher.join(60)
            assert not watcher.is_alive()
        info = manager.get("starting")
        assert info.state == "CREATING" and info.error is None, info
    finally:
        manager.delete("starting")
        manager.close()
