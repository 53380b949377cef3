"""Property-based fuzzing of every route of `/openapi.json` and of the protobuf bodies.

schemathesis generates requests from the live server's own OpenAPI schema (valid ones, and
invalid ones: out-of-range integers, wrong types, missing fields; in bodies, paths and queries); ids in the generated bodies are sometimes replaced by live ones, so
the fuzz reaches the model's operations, not only "unknown id" answers. The properties: no
answer is a server error (5xx, or a failed future of category `server`), and afterwards the model
still trains and samples. The example counts are bounded (`FUZZ_EXAMPLES` per route, derandomized)
so the whole module runs in CI in well under a minute.
"""

from __future__ import annotations

import collections
import time

import httpx
import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tether.server.config import ServerConfig  # noqa: E402
from tether.server.main import ServerThread  # noqa: E402
from tether.types import proto_schema as pb  # noqa: E402
from tether.types.proto import (  # noqa: E402
    ForwardBackwardRequestBody,
    WireDatum,
    WireTextChunk,
    encode_forward_backward_request,
)

KEY = {"X-API-Key": "tml-fuzz"}
BASE = "tether/tiny-qwen3"
FUZZ_EXAMPLES = 10
"""Generated requests per route."""
PROTO_EXAMPLES = 150
"""Mutated protobuf forward_backward bodies."""
FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def live(tmp_path_factory, default_model_dir):
    config = ServerConfig(
        port=0, data_dir=tmp_path_factory.mktemp("fuzz"), long_poll_s=2, max_request_body_bytes=4 << 20
    )
    with ServerThread(config) as url, httpx.Client(base_url=url, timeout=60, headers=KEY) as http:
        session = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "fuzz"}).json()[
            "session_id"
        ]
        answer = http.post(
            "/api/v1/create_model",
            json={"session_id": session, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 2}},
        ).json()
        assert "model_id" in _result(http, answer["request_id"])
        yield {"url": url, "http": http, "session_id": session, "model_id": answer["model_id"]}


def _result(http: httpx.Client, request_id: str):
    while True:
        response = http.post("/api/v1/retrieve_future", json={"request_id": request_id})
        assert response.status_code < 500, response.text
        if response.headers["content-type"].startswith("application/x-protobuf"):
            return response.content
        body = response.json()
        if body.get("type") != "try_again":
            return body


ANSWERS: collections.Counter = collections.Counter()
"""Status codes seen (printed with -s: shows how deep the fuzz got)."""


def _no_server_failure(http: httpx.Client, response: httpx.Response, what: str) -> None:
    ANSWERS[response.status_code] += 1
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:500]}"
    if response.status_code == 200 and "json" in response.headers.get("content-type", ""):
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("request_id"), str):
            outcome = _result(http, body["request_id"])
            ANSWERS["future failed" if isinstance(outcome, dict) and "error" in outcome else "future ok"] += 1
            if isinstance(outcome, dict):
                assert outcome.get("category") != "server", f"{what}: failed future {outcome}"


def _operations(url: str):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def _live_ids(value, ids: dict[str, str], pick: int):
    """Replace id fields of a generated body by live ones (pick: 0 keep, 1 replace)."""
    if isinstance(value, dict):
        out = {k: _live_ids(v, ids, pick) for k, v in value.items()}
        for key in ("model_id", "session_id"):
            if key in out and pick:
                out[key] = ids[key]
        return out
    if isinstance(value, list):
        return [_live_ids(v, ids, pick) for v in value]
    return value


def test_every_route_answers_generated_requests_without_a_server_error(live):
    operations = _operations(live["url"])
    assert len(operations) >= 30  # every route of the server, not a subset
    started = time.monotonic()
    failures: list[str] = []
    for operation in operations:
        try:
            _fuzz_operation(operation, live)
        except AssertionError as exc:
            failures.append(str(exc).splitlines()[0])
    elapsed = time.monotonic() - started
    print(f"fuzzed {len(operations)} routes x {FUZZ_EXAMPLES} examples in {elapsed:.1f} s: {dict(ANSWERS)}")
    ANSWERS.clear()
    assert failures == []
    _still_usable(live)


def _fuzz_operation(operation, live) -> None:
    url, http = live["url"], live["http"]
    what = f"{operation.method.upper()} {operation.path}"

    strategies = [operation.as_strategy(schemathesis.GenerationMode.POSITIVE)]
    try:  # invalid requests too: out-of-range integers, wrong types, missing fields
        strategies.append(operation.as_strategy(schemathesis.GenerationMode.NEGATIVE))
    except Exception:  # noqa: BLE001 - nothing to negate (no parameters and no body)
        pass

    @FUZZ_SETTINGS
    @given(case=st.one_of(*strategies), pick=st.integers(0, 1))
    def fuzz(case, pick):
        kwargs = case.as_transport_kwargs(base_url=url, headers=KEY)
        body = case.body if isinstance(case.body, (dict, list)) else None
        headers = {k: v for k, v in (kwargs.get("headers") or {}).items() if k.lower() == "content-type"}
        request = httpx.Request(
            kwargs["method"],
            kwargs["url"],
            params=kwargs.get("params"),
            headers={**KEY, **headers},
            json=_live_ids(body, live, pick) if body is not None else None,
        )
        _no_server_failure(http, http.send(request), what)

    fuzz()


def _fwd_message(model_id: str) -> pb.ForwardBackwardRequest:
    datum = WireDatum(
        model_input_chunks=[WireTextChunk(tokens=np.array([1, 2, 3, 4]))],
        loss_fn_inputs={"target_tokens": np.array([2, 3, 4, 5]), "weights": np.ones(4, np.float32)},
    )
    raw = encode_forward_backward_request(
        ForwardBackwardRequestBody(
            model_id=model_id,
            seq_id=None,
            forward_only=False,
            loss_fn="cross_entropy",
            loss_fn_config=None,
            data=[datum, datum],
        )
    )
    return pb.ForwardBackwardRequest.FromString(raw)


_DIMS = st.one_of(st.integers(-2, 8), st.sampled_from([0, 2**31, 2**32, 2**62, 2**63 - 1]))
_INT64 = st.integers(-(2**63), 2**63 - 1)


@st.composite
def _mutated(draw, model_id: str) -> bytes:
    msg = _fwd_message(model_id)
    datum = msg.data[draw(st.integers(0, 1))]
    kind = draw(
        st.sampled_from(["shape", "sparse", "dtype", "bytes", "tokens", "loss", "truncate", "config"])
    )
    name = draw(st.sampled_from(["target_tokens", "weights", "advantages", "logprobs"]))
    tensor = datum.loss_fn_inputs[name]
    if kind == "shape":
        del tensor.shape[:]
        tensor.shape.extend(draw(st.lists(_DIMS, max_size=3)))
    elif kind == "sparse":
        tensor.Clear()
        tensor.dtype = draw(st.sampled_from([pb.DTYPE_FLOAT32, pb.DTYPE_INT64]))
        tensor.shape.extend(draw(st.lists(_DIMS, min_size=0, max_size=3)))
        crow = draw(st.lists(_INT64, max_size=4))
        col = draw(st.lists(_INT64, max_size=4))
        tensor.sparse_csr.crow_indices = np.array(crow, "<i8").tobytes()
        tensor.sparse_csr.col_indices = np.array(col, "<i8").tobytes()
        tensor.sparse_csr.values = draw(st.binary(max_size=32))
    elif kind == "dtype":
        tensor.dtype = draw(st.integers(0, 9))
    elif kind == "bytes":
        tensor.dense = draw(st.binary(max_size=64))
    elif kind == "tokens":
        tokens = draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=6))
        datum.model_input[0].encoded_text.tokens = np.array(tokens, "<i4").tobytes()
    elif kind == "loss":
        values = draw(st.lists(st.floats(width=32), min_size=4, max_size=4))
        datum.loss_fn_inputs["weights"].dense = np.array(values, "<f4").tobytes()
        msg.loss_fn = draw(st.sampled_from(["cross_entropy", "importance_sampling", "ppo", "nope", ""]))
    elif kind == "config":
        msg.loss_fn = "ppo"
        msg.loss_fn_config[draw(st.text(max_size=8))] = draw(st.floats())
    raw = msg.SerializeToString()
    if kind == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


def test_mutated_protobuf_bodies_never_cause_a_server_error(live):
    http = live["http"]

    @settings(
        max_examples=PROTO_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(body=_mutated(live["model_id"]))
    def fuzz(body):
        response = http.post(
            "/api/v1/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"}
        )
        _no_server_failure(http, response, "forward_backward")

    started = time.monotonic()
    fuzz()
    print(f"fuzzed {PROTO_EXAMPLES} protobuf bodies in {time.monotonic() - started:.1f} s: {dict(ANSWERS)}")
    ANSWERS.clear()
    _still_usable(live)


def _still_usable(live) -> None:
    """The fuzzed model still takes a clean step, and a sampler made from it samples."""
    http, model_id = live["http"], live["model_id"]
    body = encode_forward_backward_request(
        ForwardBackwardRequestBody(
            model_id=model_id,
            seq_id=None,
            forward_only=False,
            loss_fn="cross_entropy",
            loss_fn_config=None,
            data=[
                WireDatum(
                    model_input_chunks=[WireTextChunk(tokens=np.array([1, 2, 3]))],
                    loss_fn_inputs={"target_tokens": np.array([2, 3, 4]), "weights": np.ones(3, np.float32)},
                )
            ],
        )
    )
    http.post("/api/v1/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"})
    answer = http.post(
        "/api/v1/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"}
    )
    assert isinstance(_result(http, answer.json()["request_id"]), bytes)
    step = http.post(
        "/api/v1/optim_step", json={"model_id": model_id, "adam_params": {"learning_rate": 1e-3}}
    )
    metrics = _result(http, step.json()["request_id"])["metrics"]
    assert all(isinstance(v, float) for v in metrics.values())
    sampler = http.post(
        "/api/v1/save_weights_for_sampler",
        json={"model_id": model_id, "sampling_session_seq_id": int(time.time() * 1000) % 10**9},
    )
    outcome = _result(http, sampler.json()["request_id"])
    session = outcome.get("sampling_session_id")
    assert session, outcome
    sample = http.post(
        "/api/v1/asample",
        json={
            "sampling_session_id": session,
            "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
            "sampling_params": {"max_tokens": 3, "temperature": 0.0},
        },
    )
    assert sample.status_code == 200, sample.text
    assert _result(http, sample.json()["request_id"])
