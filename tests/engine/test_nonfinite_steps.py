"""Divergence is reported: a step whose update would be non-finite is refused and changes nothing.

Reference: plain `torch.optim.AdamW` on copies, so a refused step is compared with "no step" and an
accepted one with torch's own arithmetic.
"""

from __future__ import annotations

import math

import pytest
import torch

from tether.engine.optimizer import ModelOptimizer, NonFiniteStepError
from tether.engine.training_types import MAX_LEARNING_RATE, AdamWParams
from tether.types.errors import UserInputError


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(5, 3, generator=g).requires_grad_(True),
        "b": torch.randn(7, generator=g).requires_grad_(True),
    }


def _grads(params: dict[str, torch.Tensor], scale: float = 1.0, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in params.values():
        t.grad = torch.randn(t.shape, generator=g) * scale


def _snapshot(opt: ModelOptimizer) -> dict[str, torch.Tensor]:
    out = {f"w.{n}": t.detach().clone() for n, t in opt.named_params.items()}
    out.update(opt.export_moments())
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_gradients_are_refused_and_discarded_weights_and_moments_unchanged():
    params = _params()
    opt = ModelOptimizer(params)
    _grads(params)
    opt.step(AdamWParams(learning_rate=1e-2))  # moments exist now
    before = _snapshot(opt)
    _grads(params)
    params["a"].grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteStepError) as caught:
        opt.step(AdamWParams(learning_rate=1e-2))
    assert caught.value.field == "gradients" and isinstance(caught.value, UserInputError)
    assert _same(_snapshot(opt), before)
    assert all(t.grad is None for t in params.values()) and opt.num_steps == 1


def test_huge_but_finite_gradients_whose_square_overflows_are_refused():
    params = _params()
    opt = ModelOptimizer(params)
    _grads(params, scale=1e30)  # finite, but the norm (and AdamW's second moment) overflow float32
    with pytest.raises(NonFiniteStepError):
        opt.step(AdamWParams())


def test_an_update_that_overflows_is_refused_and_keeps_the_gradients():
    params = _params()
    opt = ModelOptimizer(params)
    moments = {}  # restored moments whose ratio m / sqrt(v) is astronomically large
    for name, t in params.items():
        moments[f"exp_avg.{name}"] = torch.full(t.shape, 1e37)
        moments[f"exp_avg_sq.{name}"] = torch.zeros(t.shape)
        moments[f"step.{name}"] = torch.tensor(5.0)
    opt.import_moments(moments, num_steps=5)
    _grads(params)
    grads = {n: t.grad.clone() for n, t in params.items()}
    before = _snapshot(opt)
    with pytest.raises(NonFiniteStepError) as caught:
        opt.step(AdamWParams(learning_rate=MAX_LEARNING_RATE))
    assert caught.value.field == "adam_params.learning_rate"
    assert _same(_snapshot(opt), before)
    assert all(torch.equal(params[n].grad, grads[n]) for n in params)


def test_skip_mode_skips_and_reports():
    params = _params()
    opt = ModelOptimizer(params, on_nonfinite="skip")
    _grads(params)
    params["b"].grad[0] = float("inf")
    before = _snapshot(opt)
    metrics = opt.step(AdamWParams())
    assert metrics["skipped_nonfinite:sum"] == 1.0 and math.isinf(metrics["grad_norm:mean"])
    assert _same(_snapshot(opt), before)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_accepted_steps_match_torch_adamw(clip):
    ours, theirs = _params(), _params()
    opt = ModelOptimizer(ours)
    ref = torch.optim.AdamW(list(theirs.values()), lr=1e-2, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.1)
    for step in range(3):
        _grads(ours, seed=step)
        _grads(theirs, seed=step)
        opt.step(AdamWParams(learning_rate=1e-2, weight_decay=0.1, grad_clip_norm=clip))
        if clip:
            torch.nn.utils.clip_grad_norm_(list(theirs.values()), clip)
        ref.step()
        ref.zero_grad()
    for name in ours:
        torch.testing.assert_close(ours[name].detach(), theirs[name].detach(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "field,value",
    [
        ("learning_rate", 1e30),
        ("learning_rate", MAX_LEARNING_RATE * 2),
        ("learning_rate", float("nan")),
        ("weight_decay", 1e6),
    ],
)
def test_out_of_bound_hyperparameters_are_user_errors(field, value):
    with pytest.raises(UserInputError) as caught:
        AdamWParams(**{field: value}).validate()
    assert caught.value.field == f"adam_params.{field}"
