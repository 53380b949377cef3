"""A frozen training engine (forward-only reference trainers): forward equals the plain base model,
no gradients, no optimizer, no copies; training calls are refused; saved weights load without gradients."""

from __future__ import annotations

import pytest
import torch
from engine_reference import make_data

from tether.engine.lora import LoraSpec
from tether.engine.training_engine import AdamWParams, FrozenModelError, TrainingEngine
from tether.engine.training_types import GraphHandle

SPEC = LoraSpec(rank=4, alpha=8.0, seed=3)


def plain_logprobs(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reference: log_softmax of the plain HF model's logits at the targets."""
    with torch.no_grad():
        logits = model(tokens[None]).logits[0].float()
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]


@pytest.mark.parametrize("lora", [SPEC, None], ids=["lora", "full"])
def test_frozen_models_are_the_base_and_refuse_training(small_base, lora):
    engine = TrainingEngine(small_base, frozen=True)
    params_before = sum(p.numel() for p in small_base.model.parameters())
    engine.create_model("ref", lora=lora)
    try:
        assert sum(p.numel() for p in small_base.model.parameters()) == params_before  # no adapter added
        info = engine.model_info("ref")
        assert info["frozen"] and info["num_trainable_params"] == 0 and info["optimizer_steps"] == 0
        data = make_data([6, 4], vocab=engine.base.vocab_size)
        out = engine.forward("ref", data, "cross_entropy")
        for datum, result in zip(data, out.outputs, strict=True):
            expected = plain_logprobs(
                small_base.model, datum.input_tokens, datum.loss_fn_inputs["target_tokens"]
            )
            torch.testing.assert_close(result["logprobs"], expected, rtol=1e-5, atol=1e-5)
        calls = {
            "forward_backward": lambda: engine.forward_backward("ref", data, "cross_entropy"),
            "optim_step": lambda: engine.optim_step("ref", AdamWParams(learning_rate=1e-3)),
            "save_state": lambda: engine.export_state("ref", include_optimizer=True),
            "save_weights_for_sampler": lambda: engine.sampler_weights("ref"),
            "forward_keep_graph": lambda: engine.forward_keep_graph("ref", data),
        }
        for name, call in calls.items():
            with pytest.raises(FrozenModelError, match=f"{name} is refused.*forward-only"):
                call()
        assert all(p.grad is None for p in small_base.model.parameters())
        with pytest.raises(Exception, match="does not exist"):
            engine.backward_from_logprob_grads(GraphHandle("graph-1", "ref"), [])
    finally:
        engine.delete_model("ref")


@pytest.mark.parametrize("lora", [SPEC, None], ids=["lora", "full"])
def test_saved_weights_load_frozen_without_gradients_or_optimizer(small_base, lora):
    trained = TrainingEngine(small_base)
    trained.create_model("policy", lora=lora)
    data = make_data([6, 4, 5], vocab=trained.base.vocab_size)
    trained.forward_backward("policy", data, "cross_entropy")
    trained.optim_step("policy", AdamWParams(learning_rate=1e-2))
    state = trained.export_state("policy", include_optimizer=True)
    expected = trained.forward("policy", data, "cross_entropy")
    trained.delete_model("policy")

    frozen = TrainingEngine(small_base, frozen=True)
    with pytest.raises(FrozenModelError, match="include_optimizer"):
        frozen.import_state("ref", state, include_optimizer=True)
    frozen.import_state("ref", state, include_optimizer=False)
    try:
        got = frozen.forward("ref", data, "cross_entropy")
        for a, b in zip(got.outputs, expected.outputs, strict=True):
            torch.testing.assert_close(a["logprobs"], b["logprobs"], rtol=1e-5, atol=1e-5)
        with pytest.raises(FrozenModelError, match="forward_backward"):
            frozen.forward_backward("ref", data, "cross_entropy")
        assert all(p.grad is None for p in small_base.model.parameters())
    finally:
        frozen.delete_model("ref")
