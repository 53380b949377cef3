"""tether's one-pass custom-loss extension: forward_keep_graph + backward_from_logprob_grads."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from tether.server.config import ServerConfig
from tether.server.main import ServerThread
from tether.types.proto import decode_forward_backward_output

from .test_http_api import ALICE, fwd_body, post_fwd, result

BASE = "tether/tiny-qwen3"
TOKENS, TARGETS, WEIGHTS = (104, 101, 108, 108), (101, 108, 108, 111), (1.0, 0.5, 1.0, 2.0)


@pytest.fixture(scope="module")
def http(tmp_path_factory, default_model_dir):
    config = ServerConfig(
        port=0, data_dir=tmp_path_factory.mktemp("data"), long_poll_s=5, custom_loss_graph_ttl_s=1.0
    )
    with ServerThread(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def _model(http) -> str:
    session = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t"}, headers=ALICE).json()
    answer = http.post(
        "/api/v1/create_model",
        headers=ALICE,
        json={
            "session_id": session["session_id"],
            "model_seq_id": 0,
            "base_model": BASE,
            "lora_config": {"rank": 2, "seed": 11},
        },
    ).json()
    result(http, answer["request_id"])
    return answer["model_id"]


def _keep(http, model: str, seq_id: int) -> tuple[str, np.ndarray]:
    body = fwd_body(model, seq_id, TOKENS, TARGETS, WEIGHTS, forward_only=True)
    rid = http.post(
        "/api/v1/tether/forward_keep_graph",
        content=body,
        headers={**ALICE, "Content-Type": "application/x-protobuf"},
    ).json()["request_id"]
    out = decode_forward_backward_output(result(http, rid))
    return rid, out.loss_fn_outputs[0]["logprobs"]


def _backward(http, model: str, seq_id: int, graph_id: str, grads) -> dict:
    body = {
        "model_id": model,
        "seq_id": seq_id,
        "graph_id": graph_id,
        "type": "backward_from_logprob_grads",
        "logprob_grads": [{"data": list(map(float, grads)), "dtype": "float32", "shape": [len(grads)]}],
    }
    answer = http.post("/api/v1/tether/backward_from_logprob_grads", json=body, headers=ALICE)
    assert answer.status_code == 200, answer.text
    return result(http, answer.json()["request_id"])


def _optim(http, model: str, seq_id: int) -> None:
    rid = http.post(
        "/api/v1/optim_step",
        headers=ALICE,
        json={"model_id": model, "seq_id": seq_id, "adam_params": {"learning_rate": 0.05}},
    ).json()["request_id"]
    result(http, rid)


def _loss(http, model: str, seq_id: int) -> float:
    rid = post_fwd(http, fwd_body(model, seq_id, TOKENS, TARGETS, WEIGHTS, forward_only=True)).json()[
        "request_id"
    ]
    return decode_forward_backward_output(result(http, rid)).metrics["loss:sum"]


def test_one_pass_backward_equals_cross_entropy_forward_backward(http):
    one_pass, reference = _model(http), _model(http)
    graph_id, logprobs = _keep(http, one_pass, 1)
    assert logprobs.shape == (len(TOKENS),)
    # d(-sum(w * lp)) / d lp = -w: the same gradient cross_entropy accumulates
    metrics = _backward(http, one_pass, 2, graph_id, [-w for w in WEIGHTS])
    assert "metrics" in metrics
    _optim(http, one_pass, 3)
    result(http, post_fwd(http, fwd_body(reference, 1, TOKENS, TARGETS, WEIGHTS)).json()["request_id"])
    _optim(http, reference, 2)
    assert _loss(http, one_pass, 4) == pytest.approx(_loss(http, reference, 3), rel=1e-5)


def test_wrong_gradient_shape_is_a_user_error(http):
    model = _model(http)
    graph_id, _ = _keep(http, model, 1)
    failed = _backward(http, model, 2, graph_id, [1.0, 2.0])
    assert failed["category"] == "user" and "shape" in failed["error"]


def test_graph_expires_and_the_queue_moves_on(http):
    model = _model(http)
    before = _loss(http, model, 1)
    graph_id, _ = _keep(http, model, 2)
    time.sleep(1.6)
    failed = _backward(http, model, 3, graph_id, [-1.0] * len(TOKENS))
    assert failed["category"] == "user" and "graph" in failed["error"]
    assert _loss(http, model, 4) == pytest.approx(before, rel=1e-6)
