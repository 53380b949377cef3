"""Raw HTTP against `tether serve`: auth, owner isolation, each bad-input class, idempotent retries."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from tether.server.config import ServerConfig
from tether.server.main import ServerThread
from tether.types.proto import (
    ForwardBackwardRequestBody,
    WireDatum,
    WireTextChunk,
    decode_forward_backward_output,
    encode_forward_backward_request,
)

ALICE = {"X-API-Key": "tml-alice"}
BOB = {"X-API-Key": "tml-bob"}
BASE = "tether/tiny-qwen3"


@pytest.fixture(scope="module")
def url(tmp_path_factory, default_model_dir):
    config = ServerConfig(
        port=0, data_dir=tmp_path_factory.mktemp("data"), api_keys=["tml-alice", "tml-bob"], long_poll_s=5
    )
    with ServerThread(config) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


def result(http: httpx.Client, request_id: str, headers=ALICE):
    while True:
        response = http.post("/api/v1/retrieve_future", json={"request_id": request_id}, headers=headers)
        assert response.status_code == 200, response.text
        if response.headers["content-type"].startswith("application/x-protobuf"):
            return response.content
        body = response.json()
        if body.get("type") != "try_again":
            return body


def create_model(http: httpx.Client, headers=ALICE) -> str:
    session = http.post(
        "/api/v1/create_session", json={"tags": [], "sdk_version": "test"}, headers=headers
    ).json()["session_id"]
    answer = http.post(
        "/api/v1/create_model",
        headers=headers,
        json={"session_id": session, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 2}},
    ).json()
    assert result(http, answer["request_id"], headers)["model_id"] == answer["model_id"]
    return answer["model_id"]


def fwd_body(
    model_id: str,
    seq_id: int,
    tokens=(1, 2, 3),
    targets=(2, 3, 4),
    weights=None,
    loss_fn="cross_entropy",
    forward_only=False,
) -> bytes:
    inputs = {
        "target_tokens": np.asarray(targets, dtype=np.int64),
        "weights": np.asarray(weights if weights is not None else [1.0] * len(targets), dtype=np.float32),
    }
    datum = WireDatum(
        model_input_chunks=[WireTextChunk(np.asarray(tokens, dtype=np.int32))], loss_fn_inputs=inputs
    )
    return encode_forward_backward_request(
        ForwardBackwardRequestBody(
            model_id=model_id,
            seq_id=seq_id,
            forward_only=forward_only,
            loss_fn=loss_fn,
            loss_fn_config=None,
            data=[datum],
        )
    )


def post_fwd(http, body: bytes, headers=ALICE) -> httpx.Response:
    return http.post(
        "/api/v1/forward_backward",
        content=body,
        headers={**headers, "Content-Type": "application/x-protobuf"},
    )


@pytest.fixture(scope="module")
def model_id(http):
    return create_model(http)


def loss_of(http, model_id: str, seq_id: int) -> float:
    rid = post_fwd(http, fwd_body(model_id, seq_id, forward_only=True)).json()["request_id"]
    return decode_forward_backward_output(result(http, rid)).metrics["loss:sum"]


def test_client_config_and_health(http):
    assert http.post("/api/v1/client/config", json={"sdk_version": "0.38.0"}).status_code == 200
    health = http.get("/api/v1/healthz").json()
    assert health["status"] in ("ok", "loading") and set(health["models"]) == {BASE}
    assert http.post("/api/v1/client/dynamic_config", json={}, headers=ALICE).status_code == 404
    assert (
        http.post("/api/v1/client/dynamic_config", json={}).status_code == 401
    )  # no key: nothing is revealed


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "tml-mallory"}, {"X-API-Key": "alice"}])
def test_bad_keys_get_401_json(http, headers):
    response = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "test"}, headers=headers)
    assert response.status_code == 401
    assert response.json()["detail"]


def test_other_owner_gets_404(http, model_id):
    assert http.post("/api/v1/get_info", json={"model_id": model_id}, headers=BOB).status_code == 404
    assert post_fwd(http, fwd_body(model_id, 90), headers=BOB).status_code == 404
    assert http.get(f"/api/v1/training_runs/{model_id}", headers=BOB).status_code == 404
    assert http.get(f"/api/v1/training_runs/{model_id}", headers=ALICE).status_code == 200
    session = model_id.split(":")[0]
    assert http.get(f"/api/v1/sessions/{session}", headers=BOB).status_code == 404
    assert (
        http.post("/api/v1/session_heartbeat", json={"session_id": session}, headers=BOB).status_code == 410
    )


def test_malformed_protobuf_and_json_are_4xx(http, model_id):
    response = post_fwd(http, b"\xff\xfe not protobuf")
    assert response.status_code == 400 and "detail" in response.json()
    response = http.post(
        "/api/v1/optim_step", content=b"{not json", headers={**ALICE, "Content-Type": "application/json"}
    )
    assert response.status_code == 422 and response.json()["category"] == "user"
    response = http.post("/api/v1/optim_step", json={"seq_id": 1}, headers=ALICE)
    assert response.status_code == 422 and "model_id" in response.json()["detail"]
    response = http.post("/api/v1/asample", json=[1, 2], headers=ALICE)
    assert response.status_code == 422


def test_unknown_ids_are_404(http):
    assert (
        http.post("/api/v1/get_info", json={"model_id": "sess-x:train:0"}, headers=ALICE).status_code == 404
    )
    response = http.post(
        "/api/v1/create_model",
        headers=ALICE,
        json={"session_id": "sess-unknown", "model_seq_id": 0, "base_model": BASE},
    )
    assert response.status_code == 404
    assert http.post("/api/v1/retrieve_future", json={"request_id": "nope"}, headers=ALICE).status_code == 404
    response = http.post(
        "/api/v1/asample",
        headers=ALICE,
        json={
            "sampling_session_id": "sess-x:sample:0",
            "seq_id": 0,
            "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]}]},
            "sampling_params": {"max_tokens": 1},
        },
    )
    assert response.status_code == 404


def test_unknown_base_model_and_bad_lora_are_400(http):
    session = http.post(
        "/api/v1/create_session", json={"tags": [], "sdk_version": "test"}, headers=ALICE
    ).json()["session_id"]
    response = http.post(
        "/api/v1/create_model",
        headers=ALICE,
        json={"session_id": session, "model_seq_id": 0, "base_model": "no/such-model"},
    )
    assert response.status_code == 400 and "base_model" in response.json()["detail"]
    response = http.post(
        "/api/v1/create_model",
        headers=ALICE,
        json={
            "session_id": session,
            "model_seq_id": 1,
            "base_model": BASE,
            "lora_config": {"rank": 4, "train_mlp": False, "train_attn": False, "train_unembed": False},
        },
    )
    assert response.status_code == 422 and "train_mlp" in response.json()["detail"]


def test_out_of_vocab_and_shape_mismatch_fail_the_future_as_user_errors(http, model_id):
    before = loss_of(http, model_id, 100)
    rid = post_fwd(http, fwd_body(model_id, 101, tokens=(1, 2, 70000))).json()["request_id"]
    failed = result(http, rid)
    assert failed["category"] == "user" and "datum 0" in failed["error"]
    rid = post_fwd(http, fwd_body(model_id, 102, tokens=(1, 2, 3), targets=(2, 3))).json()["request_id"]
    failed = result(http, rid)
    assert failed["category"] == "user" and "target_tokens" in failed["error"]
    assert loss_of(http, model_id, 103) == pytest.approx(before, rel=1e-6)


def test_unsupported_loss_and_optimizer_are_rejected(http, model_id):
    response = post_fwd(http, fwd_body(model_id, 200, loss_fn="made_up"))
    assert response.status_code == 400 and "loss_fn" in response.json()["detail"]
    response = http.post(
        "/api/v1/optim_step",
        headers=ALICE,
        json={
            "model_id": model_id,
            "seq_id": 201,
            "optimizer_params": {"type": "dimuon", "learning_rate": 0.1},
        },
    )
    assert response.status_code == 400
    response = http.post(
        "/api/v1/optim_step",
        headers=ALICE,
        json={"model_id": model_id, "seq_id": 202, "adam_params": {"learning_rate": -1.0}},
    )
    assert response.status_code == 422 and "learning_rate" in response.json()["detail"]


@pytest.mark.parametrize("name", ["a/b", "..", "../up", "", "x..y"])
def test_checkpoint_names_with_slash_or_dotdot_are_400(http, model_id, name):
    response = http.post(
        "/api/v1/save_weights", headers=ALICE, json={"model_id": model_id, "path": name, "seq_id": 300}
    )
    assert response.status_code in (400, 422)
    assert response.json()["category"] == "user"


def test_loading_a_bad_path_is_400_or_404(http, model_id):
    session = model_id.split(":")[0]
    for path, status in [
        ("not-a-path", 400),
        ("tinker://x/weights/../y", 400),
        (f"tinker://{model_id}/weights/none", 404),
    ]:
        response = http.post(
            "/api/v1/load_weights",
            headers=ALICE,
            json={"session_id": session, "model_seq_id": 7, "path": path, "optimizer": False},
        )
        assert response.status_code == status, (path, response.text)


def test_retried_seq_id_is_answered_by_the_first_execution(http):
    model = create_model(http)
    first = post_fwd(http, fwd_body(model, 1))
    again = post_fwd(http, fwd_body(model, 1))
    assert first.json()["request_id"] == again.json()["request_id"]
    step = {"model_id": model, "seq_id": 2, "adam_params": {"learning_rate": 0.05}}
    opt1 = http.post("/api/v1/optim_step", json=step, headers=ALICE).json()["request_id"]
    opt2 = http.post("/api/v1/optim_step", json=step, headers=ALICE).json()["request_id"]
    assert opt1 == opt2
    result(http, opt1)
    # exactly one gradient step happened: a twin model with one step has the same loss
    twin = create_model(http)
    result(http, post_fwd(http, fwd_body(twin, 1)).json()["request_id"])
    result(
        http,
        http.post("/api/v1/optim_step", json={**step, "model_id": twin}, headers=ALICE).json()["request_id"],
    )
    assert loss_of(http, model, 3) == pytest.approx(loss_of(http, twin, 3), rel=1e-6)


def base_sampler(client: httpx.Client) -> tuple[str, str]:
    """A new session of ALICE's and a sampling session on the base model in it: (session id, sampler id)."""
    session = client.post(
        "/api/v1/create_session", json={"tags": [], "sdk_version": "test"}, headers=ALICE
    ).json()["session_id"]
    sampler = client.post(
        "/api/v1/create_sampling_session",
        headers=ALICE,
        json={"session_id": session, "sampling_session_seq_id": 0, "base_model": BASE},
    ).json()["sampling_session_id"]
    return session, sampler


def test_retried_sample_is_answered_by_the_first_execution(http):
    session, sampler = base_sampler(http)
    body = {
        "sampling_session_id": sampler,
        "seq_id": 5,
        "num_samples": 2,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [104, 105]}]},
        "sampling_params": {"max_tokens": 3, "temperature": 1.0},
    }
    first = http.post("/api/v1/asample", json=body, headers=ALICE).json()
    again = http.post("/api/v1/asample", json=body, headers=ALICE).json()
    assert first == again and len(first["sample_sequence_ids"]) == 2
    bad = http.post(
        "/api/v1/asample",
        headers=ALICE,
        json={**body, "seq_id": 6, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 99999]}]}},
    )
    assert bad.status_code == 400 and "prompt" in bad.json()["detail"]


def test_a_retry_racing_the_first_request_releases_its_sample_reservation(
    tmp_path, default_model_dir, monkeypatch
):
    config = ServerConfig(port=0, data_dir=tmp_path, max_pending_samples=4, long_poll_s=5)
    server = ServerThread(config)
    with server as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        state = server.app.state.tether
        session, sampler = base_sampler(client)
        body = {
            "sampling_session_id": sampler,
            "seq_id": 1,
            "num_samples": 2,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [104, 105]}]},
            "sampling_params": {"max_tokens": 2, "temperature": 1.0},
        }
        first = client.post("/api/v1/asample", json=body, headers=ALICE).json()
        # The retry passes the route's early lookup (as if it arrived before the first claimed its
        # seq_id) and loses the claim inside submit: it must not keep its reservation.
        monkeypatch.setattr(state.dedupe, "lookup", lambda stream, seq_id: None)
        again = client.post("/api/v1/asample", json=body, headers=ALICE).json()
        assert again == first
        result(client, first["request_id"])
        assert state.live.reserve_samples(BASE, 4, 4), "every slot is free again"


def test_finished_session_gets_410_and_frees_models(http):
    model = create_model(http)
    session = model.split(":")[0]
    assert (
        http.post("/api/v1/session_heartbeat", json={"session_id": session}, headers=ALICE).status_code == 200
    )
    http.post(f"/api/v1/sessions/{session}/finish", json={"reason": {"type": "success"}}, headers=ALICE)
    assert (
        http.post("/api/v1/session_heartbeat", json={"session_id": session}, headers=ALICE).status_code == 410
    )
    assert http.post("/api/v1/get_info", json={"model_id": model}, headers=ALICE).status_code == 404


def test_silent_session_expires(tmp_path, default_model_dir):
    config = ServerConfig(
        port=0, data_dir=tmp_path, session_timeout_s=0.5, maintenance_interval_s=0.2, long_poll_s=5
    )
    server = ServerThread(config)
    with server as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        model = create_model(client)
        training = server.app.state.tether.trainers.get(BASE).executor.training
        assert training.has_model(model)
        time.sleep(1.5)
        assert client.post("/api/v1/get_info", json={"model_id": model}, headers=ALICE).status_code == 404
        assert not training.has_model(model)  # the adapter is freed, not only hidden
        session = model.split(":")[0]
        assert (
            client.post("/api/v1/session_heartbeat", json={"session_id": session}, headers=ALICE).status_code
            == 410
        )


def test_sustained_sampling_overload_answers_429(tmp_path, default_model_dir):
    config = ServerConfig(port=0, data_dir=tmp_path, max_pending_samples=1, long_poll_s=5)
    with ServerThread(config) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        session, sampler = base_sampler(client)
        body = {
            "sampling_session_id": sampler,
            "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [104, 105]}]},
            "sampling_params": {"max_tokens": 8, "temperature": 1.0, "stop": []},
        }
        answers = [
            client.post("/api/v1/asample", json={**body, "seq_id": i}, headers=ALICE) for i in range(6)
        ]
        statuses = [a.status_code for a in answers]
        assert statuses[0] == 200 and 429 in statuses, statuses
        assert all(a.json()["detail"] for a in answers if a.status_code == 429)
        accepted = [a.json()["request_id"] for a in answers if a.status_code == 200]
        assert all(len(result(client, rid)) > 0 for rid in accepted)
        retry = client.post("/api/v1/asample", json={**body, "seq_id": statuses.index(429)}, headers=ALICE)
        assert retry.status_code == 200  # a refused seq_id can be resubmitted once there is room


def test_sampling_does_not_wait_behind_training(http, model_id):
    import threading

    session, sampler = base_sampler(http)
    body = {
        "sampling_session_id": sampler,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [104, 105]}]},
        "sampling_params": {"max_tokens": 2, "temperature": 0.0},
    }
    result(http, http.post("/api/v1/asample", json={**body, "seq_id": 0}, headers=ALICE).json()["request_id"])

    tokens = tuple(range(32, 32 + 900))
    busy = [
        post_fwd(http, fwd_body(model_id, 500 + i, tokens, tokens[1:] + (32,), forward_only=True)).json()
        for i in range(3)
    ]
    sample = http.post("/api/v1/asample", json={**body, "seq_id": 1}, headers=ALICE).json()
    finished: dict[str, float] = {}

    def wait(name: str, request_id: str) -> None:
        with httpx.Client(base_url=str(http.base_url), timeout=60) as own:
            result(own, request_id)
        finished[name] = time.monotonic()

    threads = [threading.Thread(target=wait, args=("sample", sample["request_id"]))]
    threads += [
        threading.Thread(target=wait, args=(f"train{i}", b["request_id"])) for i, b in enumerate(busy)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert finished["sample"] < finished["train2"]


def test_bad_loss_config_is_400(http, model_id):
    body = fwd_body(model_id, 600, loss_fn="ppo")
    from tether.types.proto import decode_forward_backward_request

    decoded = decode_forward_backward_request(body)
    decoded.loss_fn_config = {"clip_low_threshold": 2.0, "clip_high_threshold": 1.0}
    response = post_fwd(http, encode_forward_backward_request(decoded))
    assert response.status_code == 400 and "clip_low_threshold" in response.json()["detail"]
    decoded.loss_fn_config = {"no_such_option": 1.0}
    response = post_fwd(http, encode_forward_backward_request(decoded))
    assert response.status_code == 400 and response.json()["field"] == "loss_fn_config.no_such_option"


def test_join_sampling_session_and_trace_export(http):
    session, sampler = base_sampler(http)
    counters = [
        http.post(
            "/api/v1/join_sampling_session", json={"sampling_session_id": sampler}, headers=ALICE
        ).json()["client_counter"]
        for _ in range(2)
    ]
    assert counters == [1, 2]
    assert (
        http.post(
            "/api/v1/join_sampling_session", json={"sampling_session_id": sampler}, headers=BOB
        ).status_code
        == 404
    )
    trace = http.get(f"/api/v1/sessions/{session}/trace_export", headers=ALICE).json()
    assert trace["status"] == "failed" and trace["error"]


POST_ROUTES = [
    "create_session",
    "session_heartbeat",
    "create_model",
    "get_info",
    "forward_backward",
    "optim_step",
    "save_weights",
    "save_weights_for_sampler",
    "save_weights_external",
    "load_weights",
    "create_sampling_session",
    "asample",
    "retrieve_future",
    "cancel_future",
    "weights_info",
    "copy_weights",
    "join_sampling_session",
    "tether/forward_keep_graph",
    "tether/backward_from_logprob_grads",
]
GARBAGE = [
    b"",
    b"null",
    b"[]",
    b"{",
    b'{"model_id": 5, "seq_id": "x"}',
    b"\x00\xff" * 40,
    b'{"model_id": "a/b/../c", "path": "../../etc", "session_id": "../x", "seq_id": -1}',
]


@pytest.mark.parametrize("route", POST_ROUTES)
def test_garbage_never_gets_a_5xx(http, route):
    for body in GARBAGE:
        for content_type in ("application/json", "application/x-protobuf"):
            response = http.post(
                f"/api/v1/{route}", content=body, headers={**ALICE, "Content-Type": content_type}
            )
            assert 400 <= response.status_code < 500, (route, body, response.status_code, response.text)
            assert response.json()["detail"]
