"""Bounded requests and restart-aware futures over real HTTP.

401 before a body is read, 413 as a body streams past the limit, zstd bodies decoded off the loop
and bounded, non-finite metrics answered as JSON the official SDK parses, and a request id from an
earlier run of the server answered at once as lost to a restart (the official SDK fails fast).
"""

from __future__ import annotations

import concurrent.futures
import math
import socket
import time
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import zstandard

from tether.server.config import ServerConfig
from tether.server.main import ServerThread
from tether.types.proto import (
    ForwardBackwardRequestBody,
    WireDatum,
    WireTextChunk,
    encode_forward_backward_request,
)

KEY = {"X-API-Key": "tml-alice"}
LIMIT = 1 << 20
BASE = "tether/tiny-qwen3"


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_dir):
    config = ServerConfig(
        port=0,
        data_dir=tmp_path_factory.mktemp("data"),
        api_keys=["tml-alice"],
        long_poll_s=5,
        max_request_body_bytes=LIMIT,
        max_decoded_body_bytes=2 * LIMIT,
    )
    thread = ServerThread(config)
    with thread:
        yield thread


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.base_url


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


def _raw(url: str, head: str, body_parts=(), timeout: float = 20) -> tuple[int, bytes]:
    """Send `head` (and `body_parts`) on a raw socket; the status and body of the answer."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout) as sock:
        sock.sendall(head.encode())
        try:
            for part in body_parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and stopped reading: that is the point
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_unauthenticated_request_is_refused_before_its_body_is_sent(url):
    head = (
        "POST /api/v1/create_session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 300000000\r\n\r\n"
    )
    status, body = _raw(url, head)  # not one byte of the 300 MB body is sent
    assert status == 401 and b"API key" in body


def test_declared_oversized_body_is_413_before_it_is_read(url):
    head = (
        f"POST /api/v1/forward_backward HTTP/1.1\r\nHost: x\r\nX-API-Key: tml-alice\r\n"
        f"Content-Length: {LIMIT + 1}\r\n\r\n"
    )
    status, body = _raw(url, head)
    assert status == 413 and b"larger than this server accepts" in body


def test_chunked_body_streaming_past_the_limit_is_413(url):
    head = (
        "POST /api/v1/forward_backward HTTP/1.1\r\nHost: x\r\nX-API-Key: tml-alice\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"\0" * 65536
    parts = [b"%x\r\n" % len(piece) + piece + b"\r\n"] * (LIMIT // len(piece) + 2)
    status, _ = _raw(url, head, parts)
    assert status == 413


def test_public_routes_still_answer_without_a_key(server, http):
    assert server.app.state.tether.trainers.warm.wait(120)  # healthz says 503 while the model loads
    assert http.get("/api/v1/healthz").status_code == 200
    assert http.post("/api/v1/client/config", json={"sdk_version": "0.38.0"}).status_code == 200


def _fwd(model_id: str, datums: int = 1) -> bytes:
    datum = WireDatum(
        model_input_chunks=[WireTextChunk(tokens=np.array([1, 2, 3]))],
        loss_fn_inputs={"target_tokens": np.array([2, 3, 4]), "weights": np.ones(3, np.float32)},
    )
    return encode_forward_backward_request(
        ForwardBackwardRequestBody(
            model_id=model_id,
            seq_id=None,
            forward_only=True,
            loss_fn="cross_entropy",
            loss_fn_config=None,
            data=[datum] * datums,
        )
    )


def _result(http, request_id: str):
    while True:
        response = http.post("/api/v1/retrieve_future", json={"request_id": request_id}, headers=KEY)
        assert response.status_code == 200, response.text
        if response.headers["content-type"].startswith("application/x-protobuf"):
            return response.content
        body = response.json()
        if body.get("type") != "try_again":
            return body


@pytest.fixture(scope="module")
def model_id(http):
    session = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t"}, headers=KEY).json()
    answer = http.post(
        "/api/v1/create_model",
        headers=KEY,
        json={
            "session_id": session["session_id"],
            "model_seq_id": 0,
            "base_model": BASE,
            "lora_config": {"rank": 2},
        },
    ).json()
    assert _result(http, answer["request_id"])["model_id"] == answer["model_id"]
    return answer["model_id"]


def test_zstd_bodies_are_decoded_and_bombs_stop_at_the_decoded_limit(http, model_id):
    headers = {**KEY, "Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"}
    good = zstandard.ZstdCompressor().compress(_fwd(model_id))
    answer = http.post("/api/v1/forward_backward", content=good, headers=headers)
    assert answer.status_code == 200, answer.text
    assert isinstance(_result(http, answer.json()["request_id"]), bytes)
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (4 * LIMIT))
    assert len(bomb) < LIMIT // 100
    answer = http.post("/api/v1/forward_backward", content=bomb, headers=headers)
    assert answer.status_code == 400 and answer.json()["field"] == "body"
    assert "exceeds" in answer.json()["detail"]


def test_request_ids_name_the_server_instance(server, http, model_id):
    from tether.server.futures import instance_of_request_id

    answer = http.post(
        "/api/v1/forward_backward",
        content=_fwd(model_id),
        headers={**KEY, "Content-Type": "application/x-protobuf"},
    ).json()
    assert instance_of_request_id(answer["request_id"]) == server.app.state.tether.futures.instance_id
    _result(http, answer["request_id"])


def _sdk_future(url: str, request_id: str, model_cls):
    import tinker
    from tinker import types
    from tinker.lib.api_future_impl import _APIFuture

    service = tinker.ServiceClient(base_url=url, api_key="tml-alice")
    return _APIFuture(
        model_cls, service.holder, types.UntypedAPIFuture(request_id=request_id), time.time(), "OptimStep"
    )


def test_non_finite_metrics_reach_the_official_sdk(server):
    from tinker import types

    from tether.server.auth import owner_of_key

    done: concurrent.futures.Future = concurrent.futures.Future()
    done.set_result(
        {
            "metrics": {
                "loss:sum": math.nan,
                "grad_norm:mean": math.inf,
                "x:mean": -math.inf,
                "ok:mean": 1.5,
            },
            "type": "optim_step",
        }
    )
    server.app.state.tether.futures.add("optim-nan-1", owner_of_key("tml-alice"), done)
    metrics = _sdk_future(server.base_url, "optim-nan-1", types.OptimStepResponse).result(timeout=60).metrics
    assert math.isnan(metrics["loss:sum"]) and metrics["grad_norm:mean"] == math.inf
    assert metrics["x:mean"] == -math.inf and metrics["ok:mean"] == 1.5


def test_a_request_from_before_a_restart_fails_fast_in_the_official_sdk(tmp_path, default_model_dir):
    import tinker
    from tinker import types

    config = ServerConfig(port=0, data_dir=tmp_path, long_poll_s=5)
    with ServerThread(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        session = client.post(
            "/api/v1/create_session", json={"tags": [], "sdk_version": "t"}, headers={"X-API-Key": "tml-x"}
        ).json()["session_id"]
        lost = client.post(
            "/api/v1/create_model",
            headers={"X-API-Key": "tml-x"},
            json={"session_id": session, "model_seq_id": 0, "base_model": BASE},
        ).json()["request_id"]
    with ServerThread(config) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            body = client.post(
                "/api/v1/retrieve_future", json={"request_id": lost}, headers={"X-API-Key": "tml-x"}
            ).json()
        assert body["category"] == "server" and "restarted" in body["error"]
        service = tinker.ServiceClient(base_url=url, api_key="tml-x")
        from tinker.lib.api_future_impl import _APIFuture

        future = _APIFuture(
            types.CreateModelResponse,
            service.holder,
            types.UntypedAPIFuture(request_id=lost),
            time.time(),
            "CreateModel",
        )
        with pytest.raises(tinker.RequestFailedError, match="restarted"):  # a failed request, not retried
            future.result(timeout=60)


def test_sparse_densification_follows_the_configured_decoded_limit(http, model_id):
    from tether.types import proto_schema as pb

    msg = pb.ForwardBackwardRequest.FromString(_fwd(model_id))
    sparse = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1000, 1000])  # 1e6 elements: 4 MB > 2 MiB configured
    sparse.sparse_csr.crow_indices = np.zeros(1001, "<i8").tobytes()
    msg.data[0].loss_fn_inputs["weights"].CopyFrom(sparse)
    answer = http.post(
        "/api/v1/forward_backward",
        content=msg.SerializeToString(),
        headers={**KEY, "Content-Type": "application/x-protobuf"},
    )
    assert answer.status_code == 400 and answer.json()["field"] == "loss_fn_inputs.weights"
    assert "densify" in answer.json()["detail"]
