"""Transport: retries with backoff, HTTP errors as typed exceptions, the retrieve_future state machine."""

from __future__ import annotations

import httpx
import pytest

from tether.client import event_loop
from tether.client.transport import Transport
from tether.types.errors import AuthenticationError, NotFoundError, ServerError, UserInputError


def _transport(handler) -> Transport:
    return Transport("http://fake", "tml-k", max_retries=3, http_transport=httpx.MockTransport(handler))


def test_retries_5xx_then_succeeds_and_gives_up_after_max_retries() -> None:
    calls = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers["X-API-Key"])
        return httpx.Response(503 if len(calls) < 3 else 200, json={"ok": len(calls)})

    assert event_loop.run_sync(_transport(flaky).post_json("/x", {})) == {"ok": 3}
    assert calls == ["tml-k"] * 3

    def down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"detail": "boom", "category": "server"})

    with pytest.raises(ServerError, match="boom"):
        event_loop.run_sync(_transport(down).post_json("/x", {}))


def test_http_errors_map_to_typed_errors_without_retry() -> None:
    counts = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        counts["n"] += 1
        status = {"/a": 400, "/b": 401, "/c": 404}[request.url.path]
        return httpx.Response(status, json={"detail": f"no {request.url.path}", "category": "user"})

    t = _transport(handler)
    for path, cls in (("/a", UserInputError), ("/b", AuthenticationError), ("/c", NotFoundError)):
        with pytest.raises(cls, match=f"no {path}") as info:
            event_loop.run_sync(t.post_json(path, {}))
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
        return answers.pop(0)

    result = event_loop.run_sync(_transport(handler).retrieve_future("r", expect_proto=False))
    assert result == {"metrics": {"loss:sum": 1.5}}
    assert answers == []


def test_retrieve_future_refuses_json_where_protobuf_is_expected() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["accept"] == "application/x-protobuf"
        return httpx.Response(200, json={"loss": 1})

    with pytest.raises(ServerError, match="protobuf"):
        event_loop.run_sync(_transport(handler).retrieve_future("r", expect_proto=True))


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
