"""Transport: retries with backoff, HTTP errors as typed exceptions, the retrieve_future state machine."""

from __future__ import annotations

import json

import httpx
import pytest

from tether.client import event_loop
from tether.client.routes import Route
from tether.client.transport import Transport
from tether.types import wire
from tether.types.errors import AuthenticationError, NotFoundError, ServerError, UserInputError


def _transport(handler) -> Transport:
    return Transport("http://fake", "tml-k", max_retries=3, http_transport=httpx.MockTransport(handler))


def _route(path: str = "/x", *, future: bool = False, proto_result: bool = False) -> Route:
    """A JSON route answering its raw JSON value."""
    return Route(
        "POST",
        path,
        wire.WeightsInfoRequest,
        lambda answer, _: answer,
        future=future,
        proto_result=proto_result,
    )


def _post(transport: Transport, path: str = "/x", **kwargs):
    return event_loop.run_sync(
        transport.call(_route(path, **kwargs), wire.WeightsInfoRequest(tinker_path="p"))
    )


def test_retries_5xx_then_succeeds_and_gives_up_after_max_retries() -> None:
    calls = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers["X-API-Key"])
        return httpx.Response(503 if len(calls) < 3 else 200, json={"ok": len(calls)})

    assert _post(_transport(flaky)) == {"ok": 3}
    assert calls == ["tml-k"] * 3

    def down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"detail": "boom", "category": "server"})

    with pytest.raises(ServerError, match="boom"):
        _post(_transport(down))


def test_http_errors_map_to_typed_errors_without_retry() -> None:
    counts = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        counts["n"] += 1
        status = {"/a": 400, "/b": 401, "/c": 404}[request.url.path]
        return httpx.Response(status, json={"detail": f"no {request.url.path}", "category": "user"})

    t = _transport(handler)
    for path, cls in (("/a", UserInputError), ("/b", AuthenticationError), ("/c", NotFoundError)):
        with pytest.raises(cls, match=f"no {path}") as info:
            _post(t, path)
        assert info.value.category == "user"
    assert counts["n"] == 3


def test_retrieve_future_polls_through_try_again_and_408() -> None:
    answers = [
        httpx.Response(200, json={"type": "try_again", "request_id": "r"}),
        httpx.Response(408, json={"queue_state": "active"}),
        httpx.Response(502),
        httpx.Response(200, json={"metrics": {"loss:sum": 1.5}}),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/x":
            return httpx.Response(200, json={"request_id": "r"})
        assert json.loads(request.content) == {"request_id": "r", "allow_metadata_only": False}
        return answers.pop(0)

    result = _post(_transport(handler), future=True)
    assert result == {"metrics": {"loss:sum": 1.5}}
    assert answers == []


def test_retrieve_future_refuses_json_where_protobuf_is_expected() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/x":
            return httpx.Response(200, json={"request_id": "r"})
        assert request.headers["accept"] == "application/x-protobuf"
        return httpx.Response(200, json={"loss": 1})

    with pytest.raises(ServerError, match="protobuf"):
        _post(_transport(handler), future=True, proto_result=True)


def test_a_body_is_the_json_of_its_wire_model_and_of_no_other_type() -> None:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers["content-type"], json.loads(request.content)))
        return httpx.Response(200, json={})

    t = _transport(handler)
    body = wire.SetCheckpointTtlRequest(ttl_seconds=None)
    event_loop.run_sync(t.call(Route("PUT", "/ttl", wire.SetCheckpointTtlRequest, None), body))
    assert seen == [("application/json", {})]  # None fields are omitted, as the Tinker SDK sends them
    with pytest.raises(TypeError, match="SetCheckpointTtlRequest"):
        event_loop.run_sync(
            t.call(Route("PUT", "/ttl", wire.SetCheckpointTtlRequest, None), {"ttl_seconds": None})
        )
    with pytest.raises(TypeError):
        event_loop.run_sync(t.call(Route("POST", "/publish", None, None), body))
    assert len(seen) == 1


def test_an_answer_that_does_not_decode_is_a_server_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"sessions": "not a list"})

    route = Route(
        "GET", "/api/v1/sessions", None, lambda answer, _: wire.ListSessionsResponse.model_validate(answer)
    )
    with pytest.raises(ServerError, match="malformed answer from GET /api/v1/sessions"):
        event_loop.run_sync(_transport(handler).call(route))


def test_api_key_defaults_only_for_a_server_on_this_machine(monkeypatch):
    from tether.client.service_client import ServiceClient
    from tether.types.errors import UserInputError

    monkeypatch.delenv("TETHER_API_KEY", raising=False)
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    for url in ("http://127.0.0.1:8000", "http://localhost:9", "http://[::1]:8000"):
        client = ServiceClient(base_url=url)
        assert client._session.transport.api_key == "tml-local"
        client.close()
    with pytest.raises(UserInputError, match="api_key"):
        ServiceClient(base_url="http://gpu-box.example:8000")
