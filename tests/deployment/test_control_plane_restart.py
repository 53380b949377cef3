"""A control plane that dies while its deployments run: the next one takes them back, serving
the weights they had (real `python -m tether.deployment` processes)."""

from __future__ import annotations

import pytest
import torch

from tether.client import ServiceClient
from tether.client.deployments import DeploymentConfig, DeploymentManager
from tether.server import routes_deployments
from tether.server.config import ServerConfig
from tether.server.main import ServerThread
from tether.types.data import AdamParams, Datum, ModelInput

from .test_control_plane import KEY, prompt_logprobs


def crash(server: ServerThread, monkeypatch) -> None:
    """The control plane dies and leaves its deployments' processes running. A real crash takes its
    threads with it; here the server's registry forgets its processes, so that its watcher threads,
    still alive in this test process, write nothing more to the catalogue the next server shares
    (a watcher seeing an orphan stopped could otherwise mark its deployment FAILED after the next
    server had started it again)."""
    with monkeypatch.context() as patch:
        patch.setattr(routes_deployments, "close", lambda app: None)
        server.app.state.deployments._processes.clear()
        server.stop()


def test_a_restarted_control_plane_brings_back_its_deployments_on_their_weights(
    model_dir, tmp_path, monkeypatch
):
    config = ServerConfig(port=0, models=[str(model_dir)], data_dir=tmp_path / "serve", torch_threads=1)
    first = ServerThread(config)
    first.start()
    manager = DeploymentManager(first.base_url, KEY)
    manager.create_or_get(DeploymentConfig(deployment_id="dep-r", base_model=str(model_dir)))
    manager.wait_for_ready("dep-r", timeout_s=300)
    service = ServiceClient(base_url=first.base_url, api_key=KEY)
    trainer = service.create_lora_training_client(str(model_dir), rank=4, seed=0).result()
    tokens = [5, 17, 101, 33, 64, 200, 12, 9]
    datum = Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    trainer.forward_backward([datum], "cross_entropy").result()
    trainer.optim_step(AdamParams(learning_rate=1e-2)).result()
    path = trainer.save_weights_for_sampler_ext("step-1").result().path
    service.close()
    assert manager.hotload_and_wait("dep-r", "", path, timeout_seconds=300)
    before, identity = prompt_logprobs(manager, "dep-r")
    assert identity == path
    orphan = first.app.state.deployments._processes["dep-r"].popen
    crash(first, monkeypatch)
    manager.close()
    assert orphan.poll() is None

    second = ServerThread(config)
    second.start()
    try:
        manager = DeploymentManager(second.base_url, KEY)
        ready = manager.wait_for_ready("dep-r", timeout_s=300)
        assert ready.current_snapshot_identity == path
        after, identity = prompt_logprobs(manager, "dep-r")
        assert identity == path and torch.equal(after, before)
        assert orphan.wait(timeout=60) is not None  # the old process was stopped, not left serving
        manager.delete("dep-r")
        assert manager.list() == []
    finally:
        second.stop()
        if orphan.poll() is None:
            orphan.kill()
            pytest.fail("the orphaned deployment process was left running")


def test_delete_or_restart_first_after_a_control_plane_crash_stops_the_orphan(
    model_dir, tmp_path, monkeypatch
):
    """After a crash of the control plane, a deployment's process is an orphan. A `delete` or
    `restart` that came first left it running forever (and a restart's new process was then taken
    for a leftover and stopped by the next `get`)."""
    import sys

    from tether.server.deployments import DeploymentRegistry

    # a stand-in that never becomes ready; the marker makes it look like a deployment process
    command = [sys.executable, "-c", "import time; time.sleep(600)", "tether.deployment"]
    monkeypatch.setattr(DeploymentRegistry, "_command", lambda self, *args: command)
    config = ServerConfig(port=0, models=[str(model_dir)], data_dir=tmp_path / "serve", torch_threads=1)
    first = ServerThread(config)
    first.start()
    manager = DeploymentManager(first.base_url, KEY)
    for name in ("gone", "again"):
        manager.create_or_get(DeploymentConfig(deployment_id=name, base_model=str(model_dir)))
    orphans = {name: p.popen for name, p in first.app.state.deployments._processes.items()}
    crash(first, monkeypatch)
    manager.close()

    second = ServerThread(config)
    second.start()
    manager = DeploymentManager(second.base_url, KEY)
    try:
        manager.delete("gone")  # the first thing the new control plane is asked
        assert orphans["gone"].wait(timeout=60) is not None
        manager._call("POST", "/again/restart")
        assert orphans["again"].wait(timeout=60) is not None
        assert manager.get("again").state == "CREATING"
        assert [d.deployment_id for d in manager.list()] == ["again"]
        manager.delete("again")
    finally:
        manager.close()
        second.stop()
        for process in orphans.values():
            if process.poll() is None:
                process.kill()
