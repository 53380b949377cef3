"""Every request the SDK sends goes through `Transport.call` with a typed body, and large tensor
bodies and answers are encoded and decoded off the SDK's event loop."""

from __future__ import annotations

import threading
import time
from contextvars import ContextVar
from typing import Any

import numpy as np
import pytest
import torch

from tests.client.fake_server import VOCAB, FakeServer
from tether.client import ServiceClient, event_loop, routes
from tether.client import session as session_module
from tether.client.routes import Route
from tether.client.transport import Transport
from tether.types import proto
from tether.types.data import AdamParams, Datum, ModelInput, SamplingParams
from tether.types.proto import ForwardBackwardRequestBody
from tether.types.wire import WireModel

# The call a request belongs to: set by the traced Transport.call, read by the fake server, which
# runs inside the SDK's task (httpx.MockTransport calls its handler inline).
_CURRENT: ContextVar[tuple[Route, Any] | None] = ContextVar("current_call", default=None)


@pytest.fixture()
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture()
def traced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Route, Any]]:
    calls: list[tuple[Route, Any]] = []
    original = Transport.call

    async def call(self: Transport, route: Route, body: Any = None, **kwargs: Any) -> Any:
        calls.append((route, body))
        token = _CURRENT.set((route, body))
        try:
            return await original(self, route, body, **kwargs)
        finally:
            _CURRENT.reset(token)

    monkeypatch.setattr(Transport, "call", call)
    return calls


def _datums(rng: np.random.Generator, n: int = 2, length: int = 5) -> list[Datum]:
    out = []
    for _ in range(n):
        tokens = rng.integers(0, VOCAB, size=length + 1)
        out.append(
            Datum(
                model_input=ModelInput.from_ints(tokens[:-1].tolist()),
                loss_fn_inputs={
                    "target_tokens": tokens[1:].tolist(),
                    "weights": np.ones(length, dtype=np.float32),
                },
            )
        )
    return out


def _loss(data, logprobs):
    return sum(-lp.sum() for lp in logprobs), {}


def test_every_request_goes_through_the_one_call_with_a_typed_body(
    server: FakeServer, traced: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, str, tuple[Route, Any] | None]] = []
    server.observer = lambda request: seen.append((request.method, request.url.path, _CURRENT.get()))
    monkeypatch.setattr(session_module, "HEARTBEAT_INTERVAL_S", 0.02)
    client = ServiceClient(base_url="http://fake", api_key="tml-test", http_transport=server.transport())
    data = _datums(np.random.default_rng(0))
    prompt = ModelInput.from_ints([3, 4, 5])

    tc = client.create_lora_training_client("fake", rank=4).result(timeout=30)
    tc.forward(data, "cross_entropy").result(timeout=30)
    tc.forward_backward(data, "cross_entropy").result(timeout=30)
    tc.forward_backward_custom(data, _loss).result(timeout=30)
    tc.optim_step(AdamParams(learning_rate=0.1)).result(timeout=30)
    state = tc.save_state("s1", ttl_seconds=7200).result(timeout=30)
    sampler = tc.save_weights_for_sampler("w1").result(timeout=30)
    sc = tc.save_weights_and_get_sampling_client().result(timeout=30)
    sc.sample(prompt, 2, SamplingParams(max_tokens=2)).result(timeout=30)
    sc.compute_logprobs(prompt).result(timeout=30)
    client.create_sampling_client(base_model="fake").result(timeout=30)
    tc.create_sampling_client(sampler.path).result(timeout=30)
    client.create_training_client_from_state_with_optimizer(state.path).result(timeout=30)
    rest = client.create_rest_client()
    assert rest.get_weights_info_by_tinker_path(state.path).result(timeout=30).lora_rank == 4
    rest.set_checkpoint_ttl_from_tinker_path(state.path, 3600).result(timeout=30)
    rest.publish_checkpoint_from_tinker_path(state.path).result(timeout=30)
    rest.unpublish_checkpoint_from_tinker_path(state.path).result(timeout=30)
    rest.delete_checkpoint_from_tinker_path(state.path).result(timeout=30)
    assert rest.get_sampler("sess:sample:0").result(timeout=30).base_model == "fake"
    time.sleep(0.1)  # a few heartbeats
    client.close()

    posted = {path.rsplit("/", 1)[-1] for method, path, _ in seen if method == "POST"}
    assert posted >= {
        "create_session", "session_heartbeat", "create_model", "get_info", "forward_backward",
        "forward_keep_graph", "backward_from_logprob_grads", "optim_step", "save_weights",
        "save_weights_for_sampler", "create_sampling_session", "asample", "load_weights", "weights_info",
        "publish", "finish", "retrieve_future",
    }  # fmt: skip
    for method, path, current in seen:
        assert current is not None, f"{method} {path} was sent outside Transport.call"
        route, body = current
        if path == routes.RETRIEVE_FUTURE.path:
            assert route.future, f"{route.path} polled a future it does not have"
            continue
        assert (method, path) == (route.method, route.path)
        if method == "POST" and not path.endswith("/publish"):  # publish has no body in the protocol
            assert isinstance(body, WireModel | ForwardBackwardRequestBody), f"{path}: {type(body).__name__}"
            assert type(body).__module__.startswith(("tether.types.wire", "tether.types.proto"))
            assert isinstance(body, route.request)
    assert [p.rsplit("/", 1)[-1] for p, _ in server.numbered][:5] == [
        "forward_backward", "forward_backward", "forward_keep_graph", "backward_from_logprob_grads", "optim_step"
    ]  # fmt: skip
    assert [seq for _, seq in server.numbered] == list(range(1, len(server.numbered) + 1))


def test_large_tensor_bodies_are_encoded_and_decoded_off_the_sdk_loop(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def ident() -> int:
        return threading.get_ident()

    loop_thread = event_loop.run_sync(ident())
    threads: dict[str, set[int]] = {}

    def spy(name: str) -> None:
        codec = getattr(proto, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            threads.setdefault(name, set()).add(threading.get_ident())
            return codec(*args, **kwargs)

        monkeypatch.setattr(proto, name, wrapped)

    for name in (
        "encode_forward_backward_request",
        "decode_forward_backward_output",
        "decode_sample_response",
    ):
        spy(name)
    client = ServiceClient(base_url="http://fake", api_key="tml-test", http_transport=server.transport())
    try:
        tc = client.create_lora_training_client("fake", rank=4).result(timeout=30)
        large = _datums(np.random.default_rng(1), n=4, length=50_000)  # 200k tokens: a ~2.4 MB body
        out = tc.forward_backward(large, "cross_entropy").result(timeout=60)
        assert len(out.loss_fn_outputs) == 4 and server.W.grad is not None
        kept = tc.forward_backward_custom(_datums(np.random.default_rng(2), n=2, length=50_000), _loss)
        assert len(kept.result(timeout=60).loss_fn_outputs) == 2
        sc = client.create_sampling_client(base_model="fake").result(timeout=30)
        long_prompt = ModelInput.from_ints([1] * 100_000)  # its prompt logprobs: a ~400 KB answer
        scored = sc.sample(long_prompt, 1, SamplingParams(max_tokens=2), include_prompt_logprobs=True)
        assert len(scored.result(timeout=60).prompt_logprobs) == 100_000
    finally:
        client.close()
    assert set(threads) == {
        "encode_forward_backward_request",
        "decode_forward_backward_output",
        "decode_sample_response",
    }
    for name, idents in threads.items():
        assert loop_thread not in idents, f"{name} ran on the SDK's event loop"
    assert torch.isfinite(server.W).all()
