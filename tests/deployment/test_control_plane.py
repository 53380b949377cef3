"""`tether serve` manages deployment processes: create, hot-load chain checkpoints, sample, crash, delete.

One real server (in a thread) and real `python -m tether.deployment` subprocesses; the checkpoints
are written into the owner's store the way the trainer's save_weights_for_sampler_ext does.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from typing import Any

import httpx
import openai
import pytest
import torch

from tether.cli import main
from tether.client.deployments import DeploymentConfig, DeploymentManager, WeightSyncer
from tether.engine.model_loading import load_base_model
from tether.engine.training_engine import TrainingEngine
from tether.engine.training_types import AdamWParams, EngineDatum
from tether.server.main import ServerThread
from tether.storage import StoredHfWeights
from tether.storage.sampler_chain import save_sampler_checkpoint_ext
from tether.types.errors import ConflictError, NotFoundError, UserInputError

KEY = "tml-test"
RUN = "sess-9:train:0"
PROMPT = [5, 17, 101, 33, 64, 200, 12]


class FakePolicy:
    """The trainer side of WeightSyncer: a training engine and the owner's checkpoint store."""

    def __init__(self, server: ServerThread, model_dir) -> None:
        self.store = server.app.state.tether.checkpoints.store("local")
        self.model_dir = model_dir
        self.trainer = TrainingEngine(load_base_model(str(model_dir)))
        self.trainer.create_model("m", lora=None)
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        g = torch.Generator().manual_seed(self.steps)
        tokens = torch.randint(0, 200, (17,), generator=g)
        self.trainer.forward_backward(
            "m",
            [EngineDatum(tokens[:-1], {"target_tokens": tokens[1:], "weights": torch.ones(16)})],
            "cross_entropy",
        )
        self.trainer.optim_step("m", AdamWParams(learning_rate=1e-2))

    def save_weights_for_sampler_ext(self, name: str, checkpoint_type: str | None = None) -> dict:
        saved = save_sampler_checkpoint_ext(
            self.store,
            f"tinker://{RUN}/sampler_weights/{name}",
            StoredHfWeights(
                base_model=str(self.model_dir), tensors=self.trainer.sampler_weights("m").tensors
            ),
            checkpoint_type=checkpoint_type,
            base_model_dir=self.model_dir,
            tokenizer_dir=self.model_dir,
        )
        return {
            "path": saved.info.tinker_path,
            "checkpoint_type": saved.checkpoint_type,
            "stored_bytes": saved.stored_bytes,
            "full_bytes": saved.full_bytes,
        }

    def logprobs(self) -> torch.Tensor:
        datum = EngineDatum(
            torch.tensor(PROMPT[:-1]),
            {"target_tokens": torch.tensor(PROMPT[1:]), "weights": torch.ones(len(PROMPT) - 1)},
        )
        return self.trainer.forward("m", [datum], "cross_entropy").outputs[0]["logprobs"]


def prompt_logprobs(manager: DeploymentManager, deployment_id: str) -> tuple[torch.Tensor, str]:
    response = manager._http.post(
        f"/api/v1/tether/deployments/{deployment_id}/v1/sample",
        json={"prompt_tokens": PROMPT, "max_tokens": 1, "include_prompt_logprobs": True},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    return torch.tensor(body["prompt_logprobs"][1:]), body["weights_identity"]


def test_deployment_lifecycle_with_weight_sync(thread, model_dir):
    manager = DeploymentManager(thread.base_url, KEY)
    info = manager.create_or_get(
        DeploymentConfig(deployment_id="dep-1", base_model=str(model_dir), hot_load_transition_type="SYNC")
    )
    assert info.state in ("CREATING", "READY")
    assert (
        manager.create_or_get(
            DeploymentConfig(deployment_id="dep-1", base_model=str(model_dir))
        ).deployment_id
        == "dep-1"
    )  # get, not a second one
    with pytest.raises(UserInputError):
        manager._call("POST", "", json={"deployment_id": "dep-2", "base_model": "not/served"})
    ready = manager.wait_for_ready("dep-1", timeout_s=300)
    assert ready.state == "READY" and ready.current_snapshot_identity == "base-model"
    # the process's own port loads a directory only for the control plane, which holds its admin token
    port = thread.app.state.deployments._processes["dep-1"].port
    direct = httpx.post(f"http://127.0.0.1:{port}/hot_load", json={"path": str(model_dir)}, timeout=30)
    assert direct.status_code == 401, direct.text
    assert manager.warmup("dep-1")
    assert [d.deployment_id for d in manager.list()] == ["dep-1"]

    policy = FakePolicy(thread, model_dir)
    syncer = WeightSyncer(
        policy, manager, "dep-1", base_model=str(model_dir), rebase_every=4, rebase_fraction=None
    )
    kinds = []
    for step in range(6):
        if step:
            policy.step()
        path = syncer.save_and_hotload(f"step-{step}")
        served, identity = prompt_logprobs(manager, "dep-1")
        assert identity == path
        torch.testing.assert_close(served, policy.logprobs(), rtol=0, atol=1e-4)
        kinds.append(manager.get("dep-1").raw["current"]["checkpoint_type"])
    assert kinds == ["base", "delta", "delta", "delta", "delta", "base"]

    # Fireworks' delta metadata is checked (WeightSyncer sent it above with each delta's parent):
    # a base with it, a delta on another snapshot, a delta whose parent the deployment does not serve
    step = f"tinker://{RUN}/sampler_weights/step-{{}}"
    with pytest.raises(UserInputError, match="only a delta has a previous snapshot"):
        manager.hotload("dep-1", "", path, {"previous_snapshot_identity": step.format(4)})
    with pytest.raises(UserInputError, match="is a delta on .*step-3, not on .*step-2"):
        manager.hotload("dep-1", "", step.format(4), {"previous_snapshot_identity": step.format(2)})
    with pytest.raises(ConflictError, match="serves .*step-5, not .*step-3"):
        manager.hotload("dep-1", "", step.format(4), {"previous_snapshot_identity": step.format(3)})
    with pytest.raises(UserInputError, match="previous_snapshot_identity"):
        manager.hotload("dep-1", "", step.format(4), {"previous_snapshot_identity": 7})
    assert manager.get("dep-1").current_snapshot_identity == path  # still serving its last good weights

    # bad hot-loads: unknown checkpoint, not a path, unknown deployment
    with pytest.raises(NotFoundError):
        manager.hotload("dep-1", "", f"tinker://{RUN}/sampler_weights/nope")
    with pytest.raises(UserInputError):
        manager.hotload("dep-1", "", "step-1")
    with pytest.raises(NotFoundError):
        manager.hotload("nobody", "", path)
    assert manager.get("nobody") is None

    # DeploymentSampler: token in/out with logprobs, under a concurrency cap
    sampler = syncer.get_deployment_sampler(max_concurrency=2)

    async def many():
        return await asyncio.gather(
            *(
                sampler.sample_with_prompt_tokens(PROMPT, max_tokens=5, temperature=0.7, seed=i)
                for i in range(5)
            )
        )

    results = [c for batch in asyncio.run(many()) for c in batch]
    assert len(results) == 5 and sampler.max_in_flight_seen <= 2
    assert all(0 < len(c.inference_logprobs) <= c.completion_len for c in results)
    assert all(c.full_tokens[: c.prompt_len] == PROMPT and c.weights_identity == path for c in results)

    # the console's deployments page: state, health, the weights served (rows are the owner's: reg.list(owner))
    console = manager._http.get("/api/v1/tether/console/deployments").json()["deployments"]
    assert [(d["deployment_id"], d["state"], d["healthy"], d["serving"]) for d in console] == [
        ("dep-1", "READY", True, path)
    ]
    assert console[0]["hot_load_history"][-1] == f"{path}: done"  # the hot-load history, newest last

    # the openai package through the control plane's proxy
    client = openai.OpenAI(
        api_key=KEY, base_url=f"{thread.base_url}/api/v1/tether/deployments/dep-1/v1", max_retries=0
    )
    out = client.completions.create(model="dep-1", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1)
    assert out.choices[0].logprobs.token_logprobs
    streamed = client.completions.create(
        model="dep-1", prompt=PROMPT, max_tokens=3, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices).startswith(out.choices[0].text)

    # a crash of the serving process: restart resumes the last good weights
    before, _ = prompt_logprobs(manager, "dep-1")
    registry = thread.app.state.deployments
    registry.kill_for_test("dep-1")
    assert manager.get("dep-1").state == "FAILED"
    with pytest.raises(ConflictError):
        manager.hotload("dep-1", "", path)
    assert manager.restart("dep-1").deployment_id == "dep-1"
    manager.wait_for_ready("dep-1", timeout_s=300)
    after, identity = prompt_logprobs(manager, "dep-1")
    assert identity == path and torch.equal(after, before)

    # the CLI
    def cli(*argv: str) -> tuple[int, Any]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["deployments", "--base-url", thread.base_url, "--api-key", KEY, *argv])
        return code, json.loads(out.getvalue()) if out.getvalue() else None

    assert cli("create", "dep-1", "--base-model", str(model_dir))[1]["state"] == "READY"
    assert [d["deployment_id"] for d in cli("list")[1]] == ["dep-1"]
    first = f"tinker://{RUN}/sampler_weights/step-0"
    code, shown = cli("hotload", "dep-1", first)
    assert code == 0 and shown["current_snapshot_identity"] == first
    assert cli("get", "dep-1")[1]["current_snapshot_identity"] == first
    code, shown = cli("restart", "dep-1", "--wait")  # a new process, on the weights it had
    assert code == 0 and (shown["state"], shown["current_snapshot_identity"]) == ("READY", first)
    assert [(d["deployment_id"], d["current_snapshot_identity"]) for d in cli("list")[1]] == [
        ("dep-1", first)
    ]
    assert cli("get", "nobody") == (2, None)  # the message goes to stderr, as for any refusal
    assert cli("delete", "dep-1") == (0, {"deployment_id": "dep-1", "state": "DELETED"})
    assert manager.get("dep-1") is None and manager.list() == []
