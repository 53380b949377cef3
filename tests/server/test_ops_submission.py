"""How routes hand ops to the trainer: durable create idempotency under concurrent retries, failed
creations releasing their key, and the catalogue written when results arrive."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.test_http_api import ALICE, BASE, result
from tether.server.config import ServerConfig
from tether.server.main import ServerThread
from tether.types import ops
from tether.types.errors import ServerError


@pytest.fixture(scope="module")
def server_thread(tmp_path_factory, default_model_dir):
    config = ServerConfig(port=0, data_dir=tmp_path_factory.mktemp("data"), long_poll_s=5)
    thread = ServerThread(config)
    thread.start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def http(server_thread):
    with httpx.Client(base_url=server_thread.base_url, timeout=60) as client:
        yield client


def _session(http) -> str:
    return http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t"}, headers=ALICE).json()[
        "session_id"
    ]


def test_concurrent_create_retries_create_one_model(server_thread, http):
    session = _session(http)
    body = {
        "session_id": session,
        "model_seq_id": 0,
        "base_model": BASE,
        "lora_config": {"rank": 2, "seed": 1},
    }
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda _: http.post("/api/v1/create_model", json=body, headers=ALICE), range(8))
        )
    assert {a.status_code for a in answers} == {200}
    request_ids = {a.json()["request_id"] for a in answers}
    assert len(request_ids) == 1, "every retry is answered by the first creation"
    model_id = answers[0].json()["model_id"]
    assert result(http, request_ids.pop())["model_id"] == model_id
    state = server_thread.app.state.tether
    training = state.trainers.get(BASE).executor.training
    assert training.list_models().count(model_id) == 1
    runs, _ = state.catalogue.list_training_runs(state.auth.owner(ALICE["X-API-Key"]), 100, 0)
    assert [r.run_id for r in runs].count(model_id) == 1


def test_a_failed_creation_releases_its_key_so_a_corrected_retry_creates(server_thread, http, monkeypatch):
    session = _session(http)
    body = {"session_id": session, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 2}}
    state = server_thread.app.state.tether
    trainer = state.trainers.get(BASE)
    real_submit = trainer.submit
    calls = []

    def failing_once(op, **kwargs):
        if isinstance(op, ops.CreateModel) and not calls:
            calls.append(op)
            raise ServerError("trainer refused")
        return real_submit(op, **kwargs)

    monkeypatch.setattr(trainer, "submit", failing_once)
    first = http.post("/api/v1/create_model", json=body, headers=ALICE)
    assert first.status_code == 500 and "trainer refused" in first.text
    retry = http.post("/api/v1/create_model", json=body, headers=ALICE)
    assert retry.status_code == 200
    assert result(http, retry.json()["request_id"])["model_id"] == retry.json()["model_id"]
