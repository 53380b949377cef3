"""SDK behaviour against the in-process fake server: ordering, retries, errors, custom-loss gradients."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from tests.client.fake_server import VOCAB, FakeServer
from tether.client import ServiceClient
from tether.types.data import AdamParams, Datum, ModelInput, SamplingParams
from tether.types.errors import ServerError, TetherError, UserInputError


@pytest.fixture()
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture()
def service(server: FakeServer):
    client = ServiceClient(base_url="http://fake", api_key="tml-test", http_transport=server.transport())
    yield client
    client.close()


def _datums(rng: np.random.Generator, n: int = 3) -> list[Datum]:
    out = []
    for _ in range(n):
        length = int(rng.integers(3, 7))
        tokens = rng.integers(0, VOCAB, size=length + 1)
        out.append(
            Datum(
                model_input=ModelInput.from_ints(tokens[:-1].tolist()),
                loss_fn_inputs={
                    "target_tokens": tokens[1:].tolist(),
                    "weights": rng.random(length).astype(np.float32),
                    "advantages": rng.standard_normal(length).astype(np.float32),
                },
            )
        )
    return out


def test_pipelined_calls_are_submitted_in_seq_order(server: FakeServer, service: ServiceClient) -> None:
    tc = service.create_lora_training_client("fake", rank=4).result()
    data = _datums(np.random.default_rng(0))
    server.fail_next["/api/v1/forward_backward"] = 2  # the first submit is retried; order must hold
    futures = []
    for _ in range(3):
        futures.append(tc.forward_backward(data, "cross_entropy"))
        futures.append(tc.optim_step(AdamParams(learning_rate=0.1)))
    for f in futures:
        f.result(timeout=30)
    assert [seq for _, seq in server.numbered] == [1, 2, 3, 4, 5, 6]
    assert [p.rsplit("/", 1)[-1] for p, _ in server.numbered] == ["forward_backward", "optim_step"] * 3
    assert all(key == "tml-test" for key in server.api_keys)


def test_forward_returns_logprobs_matching_the_model(server: FakeServer, service: ServiceClient) -> None:
    tc = service.create_lora_training_client("fake").result()
    data = _datums(np.random.default_rng(1))
    out = tc.forward(data, "cross_entropy").result(timeout=30)
    for datum, record in zip(data, out.loss_fn_outputs, strict=True):
        tokens = torch.tensor(datum.model_input.to_ints())
        targets = torch.tensor(datum.loss_fn_inputs["target_tokens"].tolist())
        expected = torch.log_softmax(server.W[tokens], -1).gather(1, targets[:, None])[:, 0]
        np.testing.assert_allclose(record["logprobs"].to_numpy(), expected.detach().numpy(), rtol=1e-6)
    assert "loss:sum" in out.metrics
    assert server.W.grad is None  # forward only


def _grpo_loss(data, logprobs):
    loss = sum(
        (-lp * d.loss_fn_inputs["advantages"].to_torch()).sum() for d, lp in zip(data, logprobs, strict=True)
    )
    return loss, {"tokens:sum": float(sum(lp.numel() for lp in logprobs))}


def test_one_pass_custom_loss_gradient_equals_reference(server: FakeServer, service: ServiceClient) -> None:
    tc = service.create_lora_training_client("fake").result()
    data = _datums(np.random.default_rng(2))
    out = tc.forward_backward_custom(data, _grpo_loss).result(timeout=30)
    got = server.grad_copy()

    # Plain-PyTorch reference for the same loss on the same weights.
    W = server.W.detach().clone().requires_grad_(True)
    ref_loss = 0
    for d in data:
        tokens = torch.tensor(d.model_input.to_ints())
        targets = torch.tensor(d.loss_fn_inputs["target_tokens"].tolist())
        lp = torch.log_softmax(W[tokens], -1).gather(1, targets[:, None])[:, 0]
        ref_loss = ref_loss + (-lp * d.loss_fn_inputs["advantages"].to_torch()).sum()
    ref_loss.backward()
    np.testing.assert_allclose(got, W.grad.numpy(), atol=1e-5)
    assert out.metrics["loss:sum"] == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert out.metrics["tokens:sum"] == sum(d.model_input.length for d in data)
    # One forward pass: the tether extension routes, no forward_backward at all.
    assert [p.rsplit("/", 1)[-1] for p, _ in server.numbered] == [
        "forward_keep_graph",
        "backward_from_logprob_grads",
    ]


def test_custom_loss_returning_non_scalar_is_rejected_and_graph_released(
    server: FakeServer, service: ServiceClient
) -> None:
    tc = service.create_lora_training_client("fake").result()
    data = _datums(np.random.default_rng(3))
    fut = tc.forward_backward_custom(data, lambda d, lps: (torch.stack([lp.sum() for lp in lps]), {}))
    with pytest.raises(UserInputError, match="scalar"):
        fut.result(timeout=30)
    no_grad = tc.forward_backward_custom(data, lambda d, lps: (torch.tensor(1.0), {}))
    with pytest.raises(UserInputError, match="no grad"):
        no_grad.result(timeout=30)
    assert server.graphs == {}  # zero gradients were sent so the server freed both graphs
    np.testing.assert_array_equal(server.grad_copy(), np.zeros((VOCAB, VOCAB), dtype=np.float32))
    tc.optim_step().result(timeout=30)  # the model's queue still moves


def test_client_side_validation_names_datum_and_field(server: FakeServer, service: ServiceClient) -> None:
    tc = service.create_lora_training_client("fake").result()
    good = _datums(np.random.default_rng(4), 2)
    bad_len = Datum(
        model_input=ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [1, 2], "weights": [1, 1]},
    )
    with pytest.raises(UserInputError) as info:
        tc.forward_backward([*good, bad_len], "cross_entropy")
    assert info.value.datum_index == 2 and info.value.field == "loss_fn_inputs.target_tokens"
    bad_dtype = Datum(
        model_input=ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"target_tokens": np.array([1.0, 2.0]), "weights": [1, 1]},
    )
    with pytest.raises(UserInputError) as info:
        tc.forward_backward([bad_dtype], "cross_entropy")
    assert info.value.datum_index == 0 and "int64" in str(info.value)
    assert server.numbered == []  # nothing was sent
    tc.forward_backward(good, "cross_entropy").result(timeout=30)
    assert [seq for _, seq in server.numbered] == [1]  # no seq_id was burnt by the rejected calls


def test_failed_future_becomes_typed_error_with_category(server: FakeServer, service: ServiceClient) -> None:
    tc = service.create_lora_training_client("fake").result()
    server.fail_future["/api/v1/optim_step"] = "user"
    with pytest.raises(UserInputError, match="optim_step refused") as info:
        tc.optim_step().result(timeout=30)
    assert info.value.category == "user"
    server.fail_future["/api/v1/optim_step"] = "server"
    with pytest.raises(ServerError) as info:
        tc.optim_step().result(timeout=30)
    assert info.value.category == "server"


def test_sampling_and_async_await(server: FakeServer, service: ServiceClient) -> None:
    sc = service.create_sampling_client(base_model="fake").result()
    prompt = ModelInput.from_ints([3, 4, 5])

    async def go():
        return await sc.sample(prompt, 2, SamplingParams(max_tokens=2), include_prompt_logprobs=True)

    resp = asyncio.run(go())
    assert [s.tokens for s in resp.sequences] == [[5, 0], [5, 1]]
    assert [s.sequence_id for s in resp.sequences] == ["s0", "s1"]
    assert resp.sequences[0].logprobs == [-0.5, -0.25]
    assert resp.prompt_logprobs == [None, -1.0, -2.0]
    assert sc.compute_logprobs(prompt).result(timeout=30) == [None, -1.0, -2.0]
    assert sc.get_base_model() == "fake"


def test_client_future_also_acts_as_the_client(server: FakeServer, service: ServiceClient) -> None:
    # The Tinker SDK's creation methods return a future usable as the client; ported code does both.
    tc_future = service.create_lora_training_client("fake")
    out = tc_future.forward(_datums(np.random.default_rng(5), 1), "cross_entropy").result(timeout=30)
    assert len(out.loss_fn_outputs) == 1
    assert tc_future.model_id == tc_future.result().model_id == "sess:train:0"
    with pytest.raises(UserInputError, match="loss_type_input"):
        tc_future.forward_backward_custom(
            _datums(np.random.default_rng(6), 1), _grpo_loss, loss_type_input="embedding"
        )


def test_heartbeats_keep_the_session_alive(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from tether.client import session as session_module

    monkeypatch.setattr(session_module, "HEARTBEAT_INTERVAL_S", 0.05)
    client = ServiceClient(base_url="http://fake", api_key="tml-test", http_transport=server.transport())
    assert server.requests == []  # nothing is sent before the first call that needs the server
    client.create_lora_training_client("fake").result(timeout=30)
    time.sleep(0.5)
    client.close()
    assert server.requests.count("/api/v1/session_heartbeat") >= 3
    assert server.requests[-1] == "/api/v1/sessions/sess/finish"
    with pytest.raises(TetherError, match="closed"):
        client.create_lora_training_client("fake")


def test_sampling_accepts_tinker_package_inputs(server: FakeServer, service: ServiceClient) -> None:
    tinker = pytest.importorskip("tinker")
    sc = service.create_sampling_client(base_model="fake").result()
    resp = sc.sample(tinker.ModelInput.from_ints([7, 8]), 1, tinker.SamplingParams(max_tokens=2)).result(
        timeout=30
    )
    assert resp.sequences[0].tokens == [8, 0]
    with pytest.raises(UserInputError, match="num_samples"):
        sc.sample(ModelInput.from_ints([1]), 0, SamplingParams())


def test_loss_fn_config_is_checked_before_sending(server: FakeServer, service: ServiceClient) -> None:
    tc = service.create_lora_training_client("fake").result()
    with pytest.raises(UserInputError, match="loss_fn_config"):
        tc.forward(_datums(np.random.default_rng(7), 1), "ppo", {"clip_low_threshold": [0.8]})
    assert server.numbered == []


def test_calls_pipelined_behind_a_custom_loss_keep_their_order(
    server: FakeServer, service: ServiceClient
) -> None:
    tc = service.create_lora_training_client("fake").result()
    data = _datums(np.random.default_rng(8))
    futures = [
        tc.forward_backward_custom(data, _grpo_loss),
        tc.optim_step(),
        tc.forward_backward(data, "cross_entropy"),
    ]
    for f in futures:
        f.result(timeout=30)
    assert [(p.rsplit("/", 1)[-1], seq) for p, seq in server.numbered] == [
        ("forward_keep_graph", 1),
        ("backward_from_logprob_grads", 2),
        ("optim_step", 3),
        ("forward_backward", 4),
    ]


def test_failed_custom_forward_releases_the_queue(server: FakeServer, service: ServiceClient) -> None:
    tc = service.create_lora_training_client("fake").result()
    server.fail_future["/api/v1/tether/forward_keep_graph"] = "server"
    failed = tc.forward_backward_custom(_datums(np.random.default_rng(9)), _grpo_loss)
    after = tc.optim_step()
    with pytest.raises(ServerError, match="refused"):
        failed.result(timeout=30)
    assert after.result(timeout=30).metrics == {"learning_rate:mean": 1e-4}
    assert [(p.rsplit("/", 1)[-1], seq) for p, seq in server.numbered] == [("optim_step", 3)]


def test_invalid_request_values_are_refused_before_sending(
    server: FakeServer, service: ServiceClient
) -> None:
    tc = service.create_lora_training_client("fake").result()
    with pytest.raises(UserInputError) as info:
        tc.save_state("s", ttl_seconds=60)  # the protocol's minimum is an hour
    assert info.value.field == "ttl_seconds"
    with pytest.raises(UserInputError) as info:
        tc.optim_step({"learning_rate": -1.0})
    assert info.value.field == "learning_rate"
    assert server.numbered == []
    tc.save_state("s", ttl_seconds=7200).result(timeout=30)
    assert server.numbered == [("/api/v1/save_weights", 1)]  # no seq_id was burnt by the refused calls
