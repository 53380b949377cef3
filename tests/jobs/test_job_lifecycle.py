"""A trainer job's life through the SDK: create -> ready -> train through the control plane ->
inactivity stop -> resume -> delete -> checkpoints still listed; ownership; idempotent create."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tether.client.jobs import TrainerJobConfig, TrainerJobManager
from tether.client.service_client import ServiceClient
from tether.types.data import AdamParams
from tether.types.errors import ConflictError, NotFoundError, UserInputError
from tether.types.wire_jobs import JobState

from .conftest import ALICE, BASE, BOB, batch

WAIT = dict(poll_interval_s=0.2, timeout_s=180)


def _wait_state(manager: TrainerJobManager, job_id: str, state: JobState, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = manager.get(job_id)
        if job.state is state:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not {state.short} within {timeout_s} s: {manager.get(job_id)}")


def _logprobs(trainer) -> np.ndarray:
    out = trainer.forward(batch(99), "cross_entropy").result()
    return out.loss_fn_outputs[0]["logprobs"].to_numpy()


def test_job_lifecycle_through_the_sdk(control_plane):
    url, _ = control_plane
    alice = TrainerJobManager(url, ALICE)
    bob = TrainerJobManager(url, BOB)
    config = TrainerJobConfig(
        base_model=BASE, lora_rank=4, inactivity_timeout="4s", requested_job_id="life-1"
    )
    endpoint = alice.create_and_wait(config, **WAIT)
    assert endpoint.job_id == "life-1" and endpoint.base_url == f"{url}/training/v1/trainerJobs/life-1"
    assert alice.boot_time_s is not None and alice.get("life-1").model_load_s > 0

    # a retried create is the same job; another config under that id, or another key, is not
    assert alice.create(config).job_id == "life-1" and alice.get("life-1").restart_count == 0
    with pytest.raises(ConflictError, match="requested_job_id"):
        alice.create(config.model_copy(update={"lora_rank": 8}))
    with pytest.raises(NotFoundError):
        bob.get("life-1")
    assert bob.try_get("life-1") is None and [j.job_id for j in bob.list()] == []
    with pytest.raises(NotFoundError):
        bob.list_checkpoints("life-1")

    # train through the control plane's address only
    service = ServiceClient(base_url=endpoint.base_url, api_key=ALICE)
    trainer = service.create_lora_training_client(BASE, rank=4, seed=0).result()
    base_logprobs = _logprobs(trainer)
    for step in range(2):
        trainer.forward_backward(batch(step), "cross_entropy").result()
        trainer.optim_step(AdamParams(learning_rate=1e-2)).result()
    state_path = trainer.save_state("after-2").result().path
    sampler_path = trainer.save_weights_for_sampler("sampler-2").result().path
    trained_logprobs = _logprobs(trainer)
    assert np.abs(trained_logprobs - base_logprobs).max() > 1e-2  # training moved them (the merge is seen)
    service.close()

    # no activity for 4 s: stopped (COMPLETED, reason recorded), resumable
    stopped = _wait_state(alice, "life-1", JobState.COMPLETED, timeout_s=60)
    assert "inactivity" in stopped.reason and stopped.direct_url is None
    endpoint = alice.resume_and_wait("life-1", **WAIT)
    service = ServiceClient(base_url=endpoint.base_url, api_key=ALICE)
    restored = service.create_training_client_from_state_with_optimizer(state_path).result()
    assert restored.get_info().model_id == restored.model_id
    service.close()

    # delete: a tombstone; checkpoints stay listed (and deletable); the id cannot come back
    alice.delete("life-1")
    assert alice.get("life-1").state is JobState.DELETED
    assert "life-1" not in [j.job_id for j in alice.list()]
    assert "life-1" in [j.job_id for j in alice.list(show_deleted=True)]
    alice.delete("life-1")  # a no-op
    listed = {c.tinker_path: c for c in alice.list_checkpoints("life-1")}
    assert listed[state_path].resumable and not listed[state_path].promotable
    assert listed[sampler_path].promotable
    with pytest.raises(ConflictError, match="requested_job_id"):
        alice.create(config)
    with pytest.raises(ConflictError, match="job_id"):
        alice.resume("life-1")

    # promote the (deleted) job's sampler checkpoint: its LoRA merged into a model that a new job takes
    with pytest.raises(UserInputError, match="tinker_path"):
        alice.promote_checkpoint("life-1", state_path, "life-policy")
    with pytest.raises(UserInputError, match="output_model_id"):
        alice.promote_checkpoint("life-1", sampler_path, "Life_Policy")
    promoted = alice.promote_checkpoint("life-1", sampler_path, "life-policy")
    assert promoted.merged_lora and promoted.base_model == BASE and promoted.source == sampler_path
    with pytest.raises(ConflictError, match="output_model_id"):
        alice.promote_checkpoint("life-1", sampler_path, "life-policy")
    with pytest.raises(UserInputError, match="base_model"):
        bob.create(TrainerJobConfig(base_model="life-policy"))  # Bob has no such model
    exported = alice.export_merged("life-1", sampler_path)
    assert (Path(exported.path) / "config.json").exists() and exported.path != promoted.path

    endpoint = alice.create_and_wait(
        TrainerJobConfig(base_model="life-policy", requested_job_id="life-2"), **WAIT
    )
    service = ServiceClient(base_url=endpoint.base_url, api_key=ALICE)
    plain = service.create_lora_training_client(
        "life-policy", rank=0
    ).result()  # the promoted weights, as they are
    np.testing.assert_allclose(_logprobs(plain), trained_logprobs, rtol=0, atol=1e-4)
    service.close()
    alice.delete("life-2")

    alice.delete_checkpoint("life-1", sampler_path)
    assert sampler_path not in [c.tinker_path for c in alice.list_checkpoints("life-1")]


def test_bad_job_requests_name_the_field(control_plane):
    url, _ = control_plane
    alice = TrainerJobManager(url, ALICE)
    cases = [
        (dict(base_model="no/such-model"), "base_model"),
        (dict(base_model=BASE, node_count=1000), "node_count"),
        (dict(base_model=BASE, nproc_per_node=1000), "nproc_per_node"),
        (dict(base_model=BASE, forward_only=True, nproc_per_node=2), "forward_only"),
    ]
    for fields, field in cases:
        with pytest.raises(UserInputError, match=field):
            alice.create(TrainerJobConfig(**fields))
    with pytest.raises(Exception, match="requested_job_id"):
        TrainerJobConfig(base_model=BASE, requested_job_id="Bad_Id")
    assert alice.list() == [] or all(j.job_id != "no" for j in alice.list())


def test_job_lifecycle_through_the_cli(control_plane, capsys):
    from tether.cli import main

    url, _ = control_plane
    conn = ["--base-url", url, "--api-key", ALICE]

    def run(*argv):
        assert main(list(argv)) == 0
        return json.loads(capsys.readouterr().out)

    endpoint = run(
        "jobs",
        "create",
        *conn,
        "--base-model",
        BASE,
        "--requested-job-id",
        "cli-1",
        "--inactivity-timeout",
        "600",
        "--poll-interval-s",
        "0.2",
        "--timeout-s",
        "180",
    )
    assert endpoint["job_id"] == "cli-1" and endpoint["base_url"].endswith("/training/v1/trainerJobs/cli-1")
    assert run("jobs", "get", *conn, "--job-id", "cli-1")["state"] == "JOB_STATE_RUNNING"

    # the official Tinker SDK trains through the control plane's address too
    tinker = pytest.importorskip("tinker")
    trainer = tinker.ServiceClient(base_url=endpoint["base_url"], api_key=ALICE).create_lora_training_client(
        base_model=BASE, rank=2
    )
    datum = batch(0)[0]
    tinker_datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(datum.model_input.to_ints()),
        loss_fn_inputs={k: v.to_numpy() for k, v in datum.loss_fn_inputs.items()},
    )
    assert trainer.forward_backward([tinker_datum], "cross_entropy").result().metrics["loss:sum"] > 0
    assert "cli-1" in [j["job_id"] for j in run("jobs", "list", *conn)]
    console = httpx.get(f"{url}/api/v1/tether/console/jobs", headers={"X-API-Key": ALICE}).json()
    assert [j["state"] for j in console["jobs"] if j["job_id"] == "cli-1"] == ["RUNNING"]
    bob_console = httpx.get(f"{url}/api/v1/tether/console/jobs", headers={"X-API-Key": BOB}).json()
    assert "cli-1" not in [j["job_id"] for j in bob_console["jobs"]]
    assert run("jobs", "cancel", *conn, "--job-id", "cli-1")["state"] == "JOB_STATE_CANCELLED"
    assert run("jobs", "resume", *conn, "--job-id", "cli-1", "--poll-interval-s", "0.2")["job_id"] == "cli-1"
    assert run("checkpoints", "list", *conn, "--job-id", "cli-1") == []
    assert run("jobs", "delete", *conn, "--job-id", "cli-1")["state"] == "JOB_STATE_DELETED"
    assert main(["jobs", "resume", *conn, "--job-id", "cli-1"]) == 2  # a deleted job: a clear error
    assert "cannot be resumed" in capsys.readouterr().err
