"""copy_weights over HTTP: retries with one X-Idempotency-Key, concurrent or later, copy exactly once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.test_http_api import ALICE, create_model, result
from tether.server import routes_rest
from tether.server.auth import owner_of_key
from tether.server.config import ServerConfig
from tether.server.main import ServerThread
from tether.server.state import ServerState
from tether.types.errors import NotFoundError

SCOPE = f"copy:{owner_of_key(ALICE['X-API-Key'])}"


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_dir):
    config = ServerConfig(
        port=0, data_dir=tmp_path_factory.mktemp("data"), api_keys=["tml-alice", "tml-bob"], long_poll_s=5
    )
    thread = ServerThread(config)
    thread.start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def state(server) -> ServerState:
    return server.app.state.tether


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def source(http) -> str:
    model = create_model(http)
    answer = http.post(
        "/api/v1/save_weights", headers=ALICE, json={"model_id": model, "path": "orig", "seq_id": 1}
    )
    assert answer.status_code == 200, answer.text
    return result(http, answer.json()["request_id"])["path"]


def copy(base_url: str, source: str, key: str) -> httpx.Response:
    with httpx.Client(base_url=base_url, timeout=60) as client:  # one connection per concurrent caller
        return client.post(
            "/api/v1/copy_weights", headers={**ALICE, "X-Idempotency-Key": key}, json={"source_path": source}
        )


def copies_of(http: httpx.Client, source: str) -> list[str]:
    paths = [c["tinker_path"] for c in http.get("/api/v1/checkpoints", headers=ALICE).json()["checkpoints"]]
    return sorted(p for p in paths if p.endswith("/weights/orig") and p != source)


def test_concurrent_retries_copy_once(server, state, http, source, monkeypatch):
    real_claim, real_copy = state.catalogue.claim_idempotency_key, state.checkpoints.copy
    claims, copies, both_claimed = [], [], threading.Event()

    def claim(scope, key, value):
        answer = real_claim(scope, key, value)
        claims.append(answer)
        if len(claims) == 2:
            both_claimed.set()
        return answer

    def slow_copy(*args):
        copies.append(args)
        both_claimed.wait(timeout=20)  # hold the first copy until the retry has arrived (bounded: no hang)
        return real_copy(*args)

    monkeypatch.setattr(state.catalogue, "claim_idempotency_key", claim)
    monkeypatch.setattr(state.checkpoints, "copy", slow_copy)
    before = copies_of(http, source)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: copy(server.base_url, source, "concurrent-key"), range(2)))
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    paths = {a.json()["tinker_path"] for a in answers}
    assert len(paths) == 1 and len(copies) == 1 and both_claimed.is_set()
    assert copies_of(http, source) == sorted(before + list(paths))


def test_retry_after_success_gets_the_first_copy(server, state, http, source):
    first = copy(server.base_url, source, "later-key")
    again = copy(server.base_url, source, "later-key")
    other = copy(server.base_url, source, "another-key")
    assert first.status_code == again.status_code == other.status_code == 200
    assert again.json() == first.json() and other.json() != first.json()
    assert state.catalogue.idempotency_value(SCOPE, "later-key") == first.json()["tinker_path"]


def test_failed_copy_releases_its_key(server, state, http, source, monkeypatch):
    real_copy = state.checkpoints.copy

    def fail_once(*args):
        monkeypatch.setattr(state.checkpoints, "copy", real_copy)
        raise NotFoundError("checkpoint files of the source are missing")

    monkeypatch.setattr(state.checkpoints, "copy", fail_once)
    assert copy(server.base_url, source, "failing-key").status_code == 404
    retried = copy(server.base_url, source, "failing-key")
    assert retried.status_code == 200 and retried.json()["tinker_path"] in copies_of(http, source)


def test_claim_orphaned_by_an_earlier_process_is_taken_over(server, state, source):
    assert state.catalogue.claim_idempotency_key(SCOPE, "orphan-key", "pending:an-earlier-process") is None
    answer = copy(server.base_url, source, "orphan-key")
    assert answer.status_code == 200
    assert state.catalogue.idempotency_value(SCOPE, "orphan-key") == answer.json()["tinker_path"]


def test_copy_still_running_in_this_process_answers_409_after_a_while(server, state, source, monkeypatch):
    monkeypatch.setattr(routes_rest, "COPY_WAIT_S", 0.2)
    assert state.catalogue.claim_idempotency_key(SCOPE, "busy-key", routes_rest.COPY_PENDING) is None
    answer = copy(server.base_url, source, "busy-key")
    assert answer.status_code == 409 and "in progress" in answer.json()["detail"]
    state.catalogue.release_idempotency_key(SCOPE, "busy-key")
    assert copy(server.base_url, source, "busy-key").status_code == 200


def test_old_idempotency_keys_are_pruned_but_a_live_models_create_key_is_kept(server, state, http, source):
    from datetime import timedelta

    from tether.server.catalogue import utcnow
    from tether.server.sessions import CREATE_MODEL_SCOPE, expire_idempotency_keys

    first = copy(server.base_url, source, "prune-me")
    assert first.status_code == 200, first.text
    live_model = create_model(http)
    create_keys = [
        (scope, key)
        for scope, key in state.catalogue.idempotency_keys_before(utcnow() + timedelta(seconds=1))
        if scope.startswith(CREATE_MODEL_SCOPE)
    ]
    assert any(key == live_model for _, key in create_keys)

    assert expire_idempotency_keys(state) == 0, "nothing is older than the TTL yet"
    assert state.catalogue.idempotency_value(SCOPE, "prune-me") is not None
    later = utcnow() + timedelta(seconds=state.config.idempotency_key_ttl_s + 60)
    assert expire_idempotency_keys(state, now=later) >= 1
    assert state.catalogue.idempotency_value(SCOPE, "prune-me") is None, "the old copy key is forgotten"
    kept = state.catalogue.idempotency_keys_before(later)
    assert all(state.live.has_model(key) for scope, key in kept if scope.startswith(CREATE_MODEL_SCOPE))
    assert any(key == live_model for _, key in kept), "a live model's create key is kept"
    # A retry after the window is a new request: it copies again.
    again = copy(server.base_url, source, "prune-me")
    assert again.status_code == 200 and again.json()["tinker_path"] != first.json()["tinker_path"]
