"""gspo, reinforce and stable_reinforce: properties beyond the per-token reference of
test_training_numerics.py (which checks every loss's value and gradients through real models).

- gspo summed over a datum's tokens is sum(mask) times the GSPO paper's sequence objective when the
  datum has one advantage: checked against that objective written with a full-gradient ratio.
- gspo's ratio is per datum: the engine gives the same loss and gradients however the datums are
  split into micro-batches, and a datum's own `sequence_ratio_mask` is honoured.
- stable_reinforce reads only the sampled positions and caps the importance weight.
- the loss table: defaults and refusals, naming the field.
"""

from __future__ import annotations

import pytest
import torch
from engine_reference import make_data, reference_loss

from tether.engine.losses import gspo_loss, reinforce_loss, stable_reinforce_loss
from tether.engine.training_engine import TrainingEngine
from tether.types.errors import UserInputError
from tether.types.losses import resolve_loss_config

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


@pytest.mark.parametrize(("advantage", "shift"), [(1.5, 0.0), (1.5, 0.3), (-0.7, -0.3), (-0.7, 0.0002)])
def test_gspo_is_the_sequence_objective_times_its_length(advantage, shift):
    gen = torch.Generator().manual_seed(0)
    q = -1.0 - torch.rand(6, generator=gen)
    mask = torch.tensor([0, 0, 1, 1, 1, 1], dtype=torch.float32)
    lp_values = q + shift + 1e-4 * torch.randn(6, generator=gen)
    config = resolve_loss_config("gspo", None)
    lp = _leaf(lp_values.tolist())
    inputs = {"logprobs": q, "advantages": advantage * mask, "sequence_ratio_mask": mask}
    loss, _ = gspo_loss(lp, inputs, config)
    loss.backward()
    # the paper's objective for one sequence: s = exp(mean log ratio), gradient through every token
    ref_lp = _leaf(lp_values.tolist())
    s = torch.exp((mask * (ref_lp - q)).sum() / mask.sum())
    clipped = torch.clamp(s, config["clip_low_threshold"], config["clip_high_threshold"])
    ref = -mask.sum() * torch.min(s * advantage, clipped * advantage)
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    torch.testing.assert_close(lp.grad, ref_lp.grad, **TOL)
    if shift > 0.01 and advantage > 0:  # ratio above the band with A > 0: clipped, no gradient
        assert float(lp.grad.abs().max()) == 0.0


def test_gspo_masks_default_to_the_positions_with_an_advantage():
    q = torch.tensor([0.0, 0.0, -1.0, -2.0])
    lp = _leaf([-3.0, -4.0, -0.9, -2.1])
    adv = torch.tensor([0.0, 0.0, 1.0, 1.0])
    config = {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}
    default, _ = gspo_loss(lp, {"logprobs": q, "advantages": adv}, config)
    explicit, _ = gspo_loss(lp, {"logprobs": q, "advantages": adv, "sequence_ratio_mask": adv}, config)
    assert (
        float(default.detach()) == pytest.approx(float(explicit.detach())) == pytest.approx(-2.0)
    )  # s = exp(0) = 1


def test_stable_reinforce_reads_sampled_positions_and_caps_the_weight():
    q = torch.tensor([0.0, -1.0, -1.0, -1.0])
    lp = _leaf([-5.0, -0.2, -1.0, -3.0])  # ratios: -, e^0.8 (capped at 1.5), 1, e^-2
    inputs = {
        "logprobs": q,
        "advantages": torch.tensor([0.0, 2.0, 2.0, 2.0]),
        "sampled_mask": torch.tensor([0.0, 1.0, 1.0, 1.0]),
    }
    loss, _ = stable_reinforce_loss(lp, inputs, {"ratio_cap": 1.5, "kl_coeff": 0.0})
    loss.backward()
    expected_grad = -2.0 * torch.tensor([0.0, 1.5, 1.0, torch.exp(torch.tensor(-2.0)).item()])
    torch.testing.assert_close(lp.grad, expected_grad, **TOL)
    with_kl, _ = stable_reinforce_loss(lp, inputs, {"ratio_cap": 1.5, "kl_coeff": 0.5})
    ratio = torch.exp(lp.detach() - q)[1:]
    kl = (ratio - 1 - torch.log(ratio)).sum()
    assert float((with_kl - loss).detach()) == pytest.approx(0.5 * float(kl), rel=1e-5)


def test_reinforce_ignores_the_sampling_logprobs():
    lp = _leaf([-1.0, -2.0])
    loss, _ = reinforce_loss(lp, {"advantages": torch.tensor([1.0, -3.0])}, {})
    assert float(loss.detach()) == pytest.approx(1.0 - 6.0)


def test_gspo_does_not_depend_on_the_micro_batching(small_base):
    """Each datum keeps its own ratio: one micro-batch per datum or all datums together agree,
    with masks on some datums and the default on others."""
    results = []
    for budget in (8192, 8):
        engine = TrainingEngine(small_base, max_tokens_per_micro_batch=budget)
        engine.create_model("m", lora=None)
        data = make_data([7, 3, 5], vocab=engine.base.vocab_size, seed=4)
        mask = torch.tensor([0, 0, 1, 1, 1, 1, 0], dtype=torch.float32)
        data[0].loss_fn_inputs["sequence_ratio_mask"] = mask
        config = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
        result = engine.forward_backward("m", data, "gspo", config)
        grads = engine.accumulated_gradients("m")
        expected = sum(
            float(reference_loss("gspo", out["logprobs"], d.loss_fn_inputs, config))
            for out, d in zip(result.outputs, data, strict=True)
        )
        assert result.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        results.append((result.metrics["loss:sum"], grads))
        engine.delete_model("m")
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5, abs=1e-5)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], **TOL)


def test_loss_table_defaults_and_refusals():
    assert resolve_loss_config("stable_reinforce", None) == {"kl_coeff": 0.0, "ratio_cap": 2.0}
    assert resolve_loss_config("stable_reinforce", {"kl_coeff": 0.1})["kl_coeff"] == 0.1
    gspo = resolve_loss_config("gspo", None)
    assert gspo["clip_low_threshold"] == pytest.approx(1 - 3e-4)
    assert gspo["clip_high_threshold"] == pytest.approx(1 + 4e-4)
    assert resolve_loss_config("reinforce", None) == {}
    for loss_fn, config, field in [
        ("stable_reinforce", {"kl_coeff": -1.0}, "loss_fn_config.kl_coeff"),
        ("stable_reinforce", {"ratio_cap": 0.0}, "loss_fn_config.ratio_cap"),
        ("stable_reinforce", {"beta": 1.0}, "loss_fn_config.beta"),
        ("reinforce", {"kl_coeff": 1.0}, "loss_fn_config.kl_coeff"),
        (
            "gspo",
            {"clip_low_threshold": 1.1, "clip_high_threshold": 1.0},
            "loss_fn_config.clip_low_threshold",
        ),
    ]:
        with pytest.raises(UserInputError) as info:
            resolve_loss_config(loss_fn, config)
        assert info.value.field == field
