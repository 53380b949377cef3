"""The engine's logprobs and gradients against a plain-PyTorch reference, for every loss, LoRA and full."""

from __future__ import annotations

import pytest
import torch
from engine_reference import add_lora_hooks, make_data, plain_model, reference_logprobs, reference_loss

from tether.engine.lora import LoraSpec
from tether.engine.training_engine import TrainingEngine

LOSS_CONFIGS = {
    "cross_entropy": None,
    "importance_sampling": None,
    "ppo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "cispo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "dro": {"beta": 0.3},
    "reinforce": None,
    # wide band so some tokens clip and some do not (the logprobs are near the model's)
    "gspo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "stable_reinforce": {"kl_coeff": 0.25, "ratio_cap": 1.05},
}
TOL = {"atol": 1e-5, "rtol": 1e-5}
SPEC = LoraSpec(rank=4, alpha=8.0, seed=3)


def randomize_lora(engine: TrainingEngine, model_id: str, seed: int = 7) -> None:
    """Give B non-zero values (through import_state) so every LoRA factor gets a gradient."""
    state = engine.export_state(model_id, include_optimizer=False)
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in state.weights.items():
        if name.endswith(".lora_B"):
            tensor.copy_(0.05 * torch.randn(tensor.shape, generator=gen))
    engine.import_state(model_id, state, include_optimizer=False)


def reference_model(engine: TrainingEngine, model_id: str, lora: bool):
    model = plain_model(engine.base.path)
    if lora:
        tensors = engine.export_state(model_id, include_optimizer=False).weights
        return model, add_lora_hooks(model, tensors, SPEC.scale)
    return model, dict(model.named_parameters())


def reference_grads(model, leaves, data, loss_fn, config):
    logprobs, total = [], 0.0
    for datum in data:
        lp = reference_logprobs(model, datum)
        loss = reference_loss(loss_fn, lp, datum.loss_fn_inputs, config or {})
        loss.backward()
        logprobs.append(lp.detach())
        total += float(loss.detach())
    return logprobs, total, {n: t.grad for n, t in leaves.items() if t.grad is not None}


@pytest.fixture(params=["small_base", "small_llama_base"])
def any_engine(request):
    """An engine on each test architecture (tied-embedding Qwen3, untied Llama with biases)."""
    engine = TrainingEngine(request.getfixturevalue(request.param))
    yield engine
    for model_id in engine.list_models():
        engine.delete_model(model_id)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("loss_fn", list(LOSS_CONFIGS))
def test_logprobs_and_gradients_match_reference(any_engine, loss_fn, lora):
    check_against_reference(any_engine, loss_fn, lora)


@pytest.mark.parametrize(("loss_fn", "lora"), [("ppo", True)])
def test_default_model_matches_reference(default_base, loss_fn, lora):
    engine = TrainingEngine(default_base)
    try:
        check_against_reference(engine, loss_fn, lora)
    finally:
        for model_id in engine.list_models():
            engine.delete_model(model_id)


def check_against_reference(engine: TrainingEngine, loss_fn: str, lora: bool) -> None:
    engine.create_model("m", lora=SPEC if lora else None)
    if lora:
        randomize_lora(engine, "m")
    data = make_data([7, 3, 5], vocab=engine.base.vocab_size)
    result = engine.forward_backward("m", data, loss_fn, LOSS_CONFIGS[loss_fn])
    model, leaves = reference_model(engine, "m", lora)
    ref_lps, ref_total, ref_grads = reference_grads(model, leaves, data, loss_fn, LOSS_CONFIGS[loss_fn])
    for out, ref_lp in zip(result.outputs, ref_lps, strict=True):
        torch.testing.assert_close(out["logprobs"], ref_lp, **TOL)
    assert result.metrics["loss:sum"] == pytest.approx(ref_total, rel=1e-5, abs=1e-5)
    grads = engine.accumulated_gradients("m")
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")
    if loss_fn == "cross_entropy":
        for out, datum in zip(result.outputs, data, strict=True):
            torch.testing.assert_close(
                out["elementwise_loss"], -out["logprobs"] * datum.loss_fn_inputs["weights"]
            )


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_soft_targets_give_nk_logprobs_and_matching_gradients(any_engine, lora):
    engine = any_engine
    engine.create_model("m", lora=SPEC if lora else None)
    data = make_data([6, 4], vocab=engine.base.vocab_size, soft_k=3)
    result = engine.forward_backward("m", data, "cross_entropy")
    model, leaves = reference_model(engine, "m", lora)
    ref_lps, _, ref_grads = reference_grads(model, leaves, data, "cross_entropy", None)
    for out, ref_lp in zip(result.outputs, ref_lps, strict=True):
        assert out["logprobs"].shape == ref_lp.shape
        torch.testing.assert_close(out["logprobs"], ref_lp, **TOL)
    for name, grad in engine.accumulated_gradients("m").items():
        torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_forward_matches_forward_backward_and_records_no_gradients(training_engine):
    engine = training_engine
    engine.create_model("m", lora=SPEC)
    data = make_data([5, 2], vocab=engine.base.vocab_size)
    forward = engine.forward("m", data, "ppo")
    assert engine.accumulated_gradients("m") == {}
    backward = engine.forward_backward("m", data, "ppo")
    assert forward.metrics["loss:sum"] == pytest.approx(backward.metrics["loss:sum"], rel=1e-6)
    for a, b in zip(forward.outputs, backward.outputs, strict=True):
        torch.testing.assert_close(a["logprobs"], b["logprobs"])


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "dro"])
def test_mixed_target_shapes_in_one_micro_batch(training_engine, loss_fn):
    """1-D and (N, K) targets side by side take the per-datum path and still match the reference."""
    engine = training_engine
    engine.create_model("m", lora=SPEC)
    randomize_lora(engine, "m")
    vocab = engine.base.vocab_size
    data = (
        make_data([5], vocab=vocab)
        + make_data([4], vocab=vocab, soft_k=2, seed=1)
        + make_data([3], vocab=vocab, soft_k=3, seed=2)
    )
    result = engine.forward_backward("m", data, loss_fn, LOSS_CONFIGS[loss_fn])
    model, leaves = reference_model(engine, "m", lora=True)
    ref_lps, ref_total, ref_grads = reference_grads(model, leaves, data, loss_fn, LOSS_CONFIGS[loss_fn])
    for out, ref_lp in zip(result.outputs, ref_lps, strict=True):
        torch.testing.assert_close(out["logprobs"], ref_lp, **TOL)
    assert result.metrics["loss:sum"] == pytest.approx(ref_total, rel=1e-5, abs=1e-5)
    for name, grad in engine.accumulated_gradients("m").items():
        torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")
    handle, kept = engine.forward_keep_graph("m", data)
    assert [o["logprobs"].shape for o in kept.outputs] == [
        d.loss_fn_inputs["target_tokens"].shape for d in data
    ]
    engine.release_graph(handle)


@pytest.mark.parametrize("loss_fn", ["ppo", "cispo"])
def test_clip_thresholds_default_to_0_8_and_1_2(training_engine, loss_fn):
    engine = training_engine
    engine.create_model("m", lora=SPEC)
    randomize_lora(engine, "m")
    data = make_data([6, 5], vocab=engine.base.vocab_size)
    model, leaves = reference_model(engine, "m", lora=True)
    _, ref_default, _ = reference_grads(
        model, leaves, data, loss_fn, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    )
    _, ref_tight, _ = reference_grads(
        model, leaves, data, loss_fn, {"clip_low_threshold": 0.99, "clip_high_threshold": 1.01}
    )
    assert ref_default != pytest.approx(ref_tight, abs=1e-4)  # the data does reach the clipping range
    default = engine.forward("m", data, loss_fn).metrics["loss:sum"]
    tight = engine.forward(
        "m", data, loss_fn, {"clip_low_threshold": 0.99, "clip_high_threshold": 1.01}
    ).metrics["loss:sum"]
    assert default == pytest.approx(ref_default, rel=1e-5, abs=1e-5)
    assert tight == pytest.approx(ref_tight, rel=1e-5, abs=1e-5)
