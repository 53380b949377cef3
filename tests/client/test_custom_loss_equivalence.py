"""One-pass `forward_backward_custom` gives the same gradients as the two-pass method and the built-in loss.

Gradients are compared through what the server reveals: `grad_norm:mean` of the optimizer step, and
the model's logprobs after one AdamW step in its linear regime (eps much larger than every gradient,
so the update is lr / eps * gradient and the new weights encode the gradient itself). Each model
starts from the same seeded LoRA initialisation. The two-pass reference is the official `tinker`
SDK's own `forward_backward_custom` against the same server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from tests.client.conftest import MODEL
from tether.client import ServiceClient
from tether.types.data import AdamParams, Datum, ModelInput

tinker = pytest.importorskip("tinker")

LINEAR_ADAM = {
    "learning_rate": 10.0,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 100.0,
    "weight_decay": 0.0,
    "grad_clip_norm": 0.0,
}
TOL = 1e-5


def _datum(prompt: str, completion: str, extra: dict[str, np.ndarray] | None = None) -> Datum:
    tokens = list((prompt + completion).encode())
    weights = np.array([0.0] * (len(prompt) - 1) + [1.0] * len(completion), dtype=np.float32)
    inputs: dict[str, Any] = {"target_tokens": tokens[1:], "weights": weights}
    inputs.update(extra or {})
    return Datum(model_input=ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def _to_tinker(datum: Datum):
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(datum.model_input.to_ints()),
        loss_fn_inputs={
            k: tinker.TensorData.from_numpy(v.to_numpy()) for k, v in datum.loss_fn_inputs.items()
        },
    )


PROBE = [_datum("probe: ", "the quick brown fox"), _datum("Q: 2+2? A: ", "four")]


def _after_step(tc, probe, adam) -> tuple[float, np.ndarray]:
    metrics = tc.optim_step(adam).result().metrics
    out = tc.forward(probe, "cross_entropy").result()
    return metrics["grad_norm:mean"], np.concatenate([o["logprobs"].to_numpy() for o in out.loss_fn_outputs])


def one_pass(service: ServiceClient, data: list[Datum], loss_fn: Callable) -> tuple[float, np.ndarray, dict]:
    tc = service.create_lora_training_client(MODEL, rank=4, seed=0).result()
    out = tc.forward_backward_custom(data, loss_fn).result()
    return (*_after_step(tc, PROBE, AdamParams(**LINEAR_ADAM)), out.metrics)


def built_in(service: ServiceClient, data: list[Datum], loss_name: str) -> tuple[float, np.ndarray]:
    tc = service.create_lora_training_client(MODEL, rank=4, seed=0).result()
    tc.forward_backward(data, loss_name).result()
    return _after_step(tc, PROBE, AdamParams(**LINEAR_ADAM))


def two_pass_official(server_url: str, data: list[Datum], loss_fn: Callable) -> tuple[float, np.ndarray]:
    sc = tinker.ServiceClient(base_url=server_url, api_key="tml-test")
    try:
        tc = sc.create_lora_training_client(base_model=MODEL, rank=4, seed=0).result()
        tc.forward_backward_custom([_to_tinker(d) for d in data], loss_fn).result()
        return _after_step(tc, [_to_tinker(d) for d in PROBE], tinker.AdamParams(**LINEAR_ADAM))
    finally:
        sc.close("success").result()


def assert_same(a: tuple[float, np.ndarray], b: tuple[float, np.ndarray]) -> None:
    assert a[0] == pytest.approx(b[0], rel=TOL)
    np.testing.assert_allclose(a[1], b[1], atol=TOL, rtol=0)


def _base_logprobs(service: ServiceClient, data: list[Datum]) -> list[np.ndarray]:
    tc = service.create_lora_training_client(MODEL, rank=4, seed=0).result()
    return [o["logprobs"].to_numpy() for o in tc.forward(data, "cross_entropy").result().loss_fn_outputs]


def test_grpo_style_loss_matches_two_pass_and_built_in_importance_sampling(service, server_url) -> None:
    rng = np.random.default_rng(0)
    texts = [
        ("Solve: 3*3=", "9"),
        ("Solve: 3*3=", "6"),
        ("Name a color: ", "blue"),
        ("Name a color: ", "rock"),
    ]
    plain = [_datum(p, c) for p, c in texts]
    sampled = _base_logprobs(service, plain)
    data = []
    for (p, c), lp in zip(texts, sampled, strict=True):
        length = lp.shape[0]
        advantages = np.where(np.arange(length) >= length - len(c), rng.standard_normal(), 0.0).astype(
            np.float32
        )
        noisy = (lp + rng.normal(0, 0.05, size=length)).astype(np.float32)
        data.append(_datum(p, c, {"logprobs": noisy, "advantages": advantages}))

    def grpo_loss(batch, logprobs):
        total = 0
        for d, lp in zip(batch, logprobs, strict=True):
            ratio = torch.exp(lp - d.loss_fn_inputs["logprobs"].to_torch())
            total = total - (ratio * d.loss_fn_inputs["advantages"].to_torch()).sum()
        return total, {"ratio_tokens:sum": float(sum(x.numel() for x in logprobs))}

    one = one_pass(service, data, grpo_loss)
    assert one[2]["ratio_tokens:sum"] == sum(d.model_input.length for d in data)
    assert_same(one[:2], two_pass_official(server_url, data, grpo_loss))
    is_data = [
        Datum(
            model_input=d.model_input,
            loss_fn_inputs={k: v for k, v in d.loss_fn_inputs.items() if k != "weights"},
        )
        for d in data
    ]
    assert_same(one[:2], built_in(service, is_data, "importance_sampling"))

    # The comparison can fail: a 0.1% different loss is detected.
    scaled = one_pass(service, data, lambda b, lps: (grpo_loss(b, lps)[0] * 1.001, {}))
    assert abs(scaled[0] - one[0]) > 100 * TOL * one[0]


def test_dpo_style_pair_loss_matches_two_pass(service, server_url) -> None:
    pairs = [("Q: capital of France? A: ", "Paris", "Rome"), ("Q: 1+1? A: ", "2", "11")]
    data = [_datum(p, c) for p, chosen, rejected in pairs for c in (chosen, rejected)]
    reference = [
        float((lp * d.loss_fn_inputs["weights"].to_numpy()).sum())
        for lp, d in zip(_base_logprobs(service, data), data, strict=True)
    ]
    beta = 0.5

    def dpo_loss(batch, logprobs):
        seq = [
            (lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(batch, logprobs, strict=True)
        ]
        losses = []
        for i in range(0, len(seq), 2):
            margin = (seq[i] - reference[i]) - (seq[i + 1] - reference[i + 1]) + 0.3 * (i + 1)
            losses.append(-torch.nn.functional.logsigmoid(beta * margin))
        loss = torch.stack(losses).mean()
        return loss, {"dpo_loss:mean": float(loss.detach())}

    one = one_pass(service, data, dpo_loss)
    assert one[2]["loss:sum"] == pytest.approx(one[2]["dpo_loss:mean"], rel=1e-6)
    assert_same(one[:2], two_pass_official(server_url, data, dpo_loss))


def test_cross_entropy_as_custom_loss_matches_built_in(service) -> None:
    data = [_datum("Translate: chat -> ", "cat"), _datum("Translate: chien -> ", "dog")]

    def ce(batch, logprobs):
        return sum(
            (-lp * d.loss_fn_inputs["weights"].to_torch()).sum()
            for d, lp in zip(batch, logprobs, strict=True)
        ), {}

    assert_same(one_pass(service, data, ce)[:2], built_in(service, data, "cross_entropy"))
