"""Training engine behaviour: accumulation, micro-batching, isolation, LoRA flags, state, custom loss."""

from __future__ import annotations

import pytest
import torch
from engine_reference import make_data

from tether.engine.lora import LoraSpec
from tether.engine.training_engine import AdamWParams, EngineDatum, TrainingEngine
from tether.types.errors import ConflictError, NotFoundError, UserInputError

SPEC = LoraSpec(rank=4, alpha=8.0, seed=3)
ADAM = AdamWParams(learning_rate=1e-2, weight_decay=0.1, grad_clip_norm=1.0)


def weights_of(engine: TrainingEngine, model_id: str) -> dict[str, torch.Tensor]:
    return engine.export_state(model_id, include_optimizer=False).weights


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> None:
    assert set(a) == set(b)
    for name in a:
        if tol:
            torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("lora", [SPEC, None], ids=["lora", "full"])
def test_two_forward_backwards_then_step_equal_one_concatenated_call(training_engine, lora):
    engine = training_engine
    data = make_data([6, 4, 5, 3], vocab=engine.base.vocab_size)
    for model_id in ("split", "joined"):
        engine.create_model(model_id, lora=lora)
    first = engine.forward_backward("split", data[:2], "cross_entropy")
    second = engine.forward_backward("split", data[2:], "cross_entropy")
    joined = engine.forward_backward("joined", data, "cross_entropy")
    assert first.metrics["loss:sum"] + second.metrics["loss:sum"] == pytest.approx(
        joined.metrics["loss:sum"], abs=1e-5
    )
    assert_same_tensors(
        engine.accumulated_gradients("split"), engine.accumulated_gradients("joined"), atol=1e-5, rtol=1e-5
    )
    # Adam's first step is about lr * grad / (|grad| + eps): with a tiny eps, float noise (~1e-6) in
    # near-zero gradient entries would change whole steps, so this comparison uses an eps above it.
    adam = AdamWParams(learning_rate=1e-2, eps=1e-2, weight_decay=0.1, grad_clip_norm=1.0)
    step_split = engine.optim_step("split", adam)
    step_joined = engine.optim_step("joined", adam)
    assert step_split["grad_norm:mean"] == pytest.approx(step_joined["grad_norm:mean"], rel=1e-5)
    assert step_split["learning_rate:mean"] == adam.learning_rate
    assert_same_tensors(weights_of(engine, "split"), weights_of(engine, "joined"), atol=1e-5, rtol=1e-5)
    assert engine.accumulated_gradients("split") == {}  # cleared by the step


@pytest.mark.parametrize("lora", [SPEC, None], ids=["lora", "full"])
def test_micro_batched_equals_unbatched(small_base, lora):
    data = make_data([9, 2, 7, 4, 4], vocab=small_base.vocab_size)
    results, grads = [], []
    for budget in (10_000, 9):
        engine = TrainingEngine(small_base, max_tokens_per_micro_batch=budget)
        engine.create_model("m", lora=lora)
        results.append(engine.forward_backward("m", data, "importance_sampling"))
        grads.append(engine.accumulated_gradients("m"))
        engine.delete_model("m")
    big, small = results
    assert small.metrics["loss:sum"] == pytest.approx(big.metrics["loss:sum"], rel=1e-5)
    for a, b in zip(big.outputs, small.outputs, strict=True):
        torch.testing.assert_close(a["logprobs"], b["logprobs"], atol=1e-5, rtol=1e-5)
    assert_same_tensors(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def test_adapters_and_full_models_are_isolated(training_engine):
    engine = training_engine
    base_before = {k: v.clone() for k, v in engine.base.model.state_dict().items()}
    engine.create_model("a", lora=LoraSpec(rank=2, seed=1))
    engine.create_model("b", lora=LoraSpec(rank=2, seed=1))
    engine.create_model("full", lora=None)
    b_before, full_before = weights_of(engine, "b"), weights_of(engine, "full")
    data = make_data([5, 3], vocab=engine.base.vocab_size)
    for model_id in ("a", "full"):
        for _ in range(2):
            engine.forward_backward(model_id, data, "cross_entropy")
            engine.optim_step(model_id, ADAM)
    assert not torch.equal(
        weights_of(engine, "a")["lm_head.lora_B"], weights_of(engine, "b")["lm_head.lora_B"]
    )
    assert_same_tensors(weights_of(engine, "b"), b_before)
    assert engine.accumulated_gradients("b") == {}
    assert_same_tensors(engine.base.model.state_dict(), base_before)
    changed = weights_of(engine, "full")
    assert any(not torch.equal(changed[n], full_before[n]) for n in changed)
    # the untouched adapter still computes exactly what the base model computes (B is zero)
    base_only = TrainingEngine(engine.base)
    out_b = engine.forward("b", data, "cross_entropy").outputs
    engine.delete_model("a")
    assert not engine.has_model("a") and engine.has_model("b")
    assert [o["logprobs"] for o in engine.forward("b", data, "cross_entropy").outputs][0].equal(
        out_b[0]["logprobs"]
    )
    assert base_only.list_models() == []


@pytest.mark.parametrize(
    ("flags", "forbidden"),
    [
        ({"train_mlp": False}, "mlp."),
        ({"train_attn": False}, "self_attn."),
        ({"train_unembed": False}, "lm_head."),
    ],
)
def test_lora_flags_choose_the_trained_layers(training_engine, flags, forbidden):
    engine = training_engine
    engine.create_model("m", lora=LoraSpec(rank=2, seed=0, **flags))
    names = set(weights_of(engine, "m"))
    assert names and not any(forbidden in n for n in names)
    engine.forward_backward("m", make_data([4], vocab=engine.base.vocab_size), "cross_entropy")
    assert set(engine.accumulated_gradients("m")) == names
    info = engine.model_info("m")
    assert info["is_lora"] and info["lora_rank"] == 2 and info["lora"][next(iter(flags))] is False


def test_full_fine_tuning_trains_every_parameter(training_engine):
    engine = training_engine
    engine.create_model("full", lora=None)
    engine.forward_backward("full", make_data([4, 3], vocab=engine.base.vocab_size), "cross_entropy")
    names = set(engine.accumulated_gradients("full"))
    expected = {n.replace(".base.", ".") for n, _ in engine.base.model.named_parameters()}
    assert names == expected
    assert engine.model_info("full")["lora_rank"] == 0


def test_optimizer_state_round_trip_continues_bit_exactly(training_engine):
    engine = training_engine
    data = make_data([5, 4], vocab=engine.base.vocab_size, seed=1)
    more = make_data([3, 6], vocab=engine.base.vocab_size, seed=2)
    for lora in (SPEC, None):
        engine.create_model("orig", lora=lora)
        engine.forward_backward("orig", data, "cross_entropy")
        engine.optim_step("orig", ADAM)
        state = engine.export_state("orig", include_optimizer=True)
        engine.import_state("restored", state, include_optimizer=True)
        for model_id in ("orig", "restored"):
            engine.forward_backward(model_id, more, "cross_entropy")
            engine.optim_step(model_id, ADAM)
        assert_same_tensors(weights_of(engine, "orig"), weights_of(engine, "restored"))
        assert_same_tensors(
            engine.export_state("orig", include_optimizer=True).optimizer,
            engine.export_state("restored", include_optimizer=True).optimizer,
        )
        assert engine.model_info("restored")["optimizer_steps"] == 2
        state.weights[next(iter(state.weights))].add_(1.0)  # exported copies are detached from the model
        assert not torch.equal(
            state.weights[next(iter(state.weights))], weights_of(engine, "orig")[next(iter(state.weights))]
        )
        engine.delete_model("orig")
        engine.delete_model("restored")


def test_import_without_optimizer_starts_fresh_moments_and_rejects_mismatched_state(training_engine):
    engine = training_engine
    engine.create_model("m", lora=SPEC)
    engine.forward_backward("m", make_data([4], vocab=engine.base.vocab_size), "cross_entropy")
    engine.optim_step("m", ADAM)
    state = engine.export_state("m", include_optimizer=False)
    assert state.optimizer is None and state.metadata["is_lora"] and state.metadata["lora"]["rank"] == 4
    with pytest.raises(UserInputError, match="optimizer"):
        engine.import_state("n", state, include_optimizer=True)
    engine.import_state("n", state, include_optimizer=False)
    assert engine.export_state("n", include_optimizer=True).optimizer == {}
    bad = engine.export_state("m", include_optimizer=False)
    bad.weights.pop(next(iter(bad.weights)))
    with pytest.raises(UserInputError, match="weights"):
        engine.import_state("m", bad, include_optimizer=False)
    full = engine.export_state("m", include_optimizer=True)
    name = next(iter(full.optimizer))
    full.optimizer[name] = full.optimizer[name][:1]
    before = weights_of(engine, "m")
    with pytest.raises(UserInputError, match="optimizer"):
        engine.import_state("m", full, include_optimizer=True)
    assert engine.has_model("m")  # a rejected state replaces nothing
    assert_same_tensors(weights_of(engine, "m"), before)


def test_sampler_weights_are_frozen_copies(training_engine):
    engine = training_engine
    engine.create_model("lora", lora=SPEC)
    engine.create_model("full", lora=None)
    lora_weights = engine.sampler_weights("lora")
    assert (
        lora_weights.is_lora
        and lora_weights.lora_spec == SPEC
        and lora_weights.base_model == engine.base.name
    )
    assert "model.layers.0.self_attn.q_proj.lora_A" in lora_weights.tensors
    full_weights = engine.sampler_weights("full")
    assert not full_weights.is_lora
    plain_names = {n.replace(".base.", ".") for n in engine.base.model.state_dict()}
    assert set(full_weights.tensors) == plain_names
    snapshot = {k: v.clone() for k, v in lora_weights.tensors.items()}
    for model_id in ("lora", "full"):
        engine.forward_backward(model_id, make_data([4], vocab=engine.base.vocab_size), "cross_entropy")
        engine.optim_step(model_id, ADAM)
    assert_same_tensors(lora_weights.tensors, snapshot)
    assert all(not t.requires_grad for t in full_weights.tensors.values())


@pytest.mark.parametrize("lora", [SPEC, None], ids=["lora", "full"])
def test_backward_from_logprob_grads_equals_cross_entropy_with_negated_grads(small_base, lora):
    engine = TrainingEngine(small_base, max_tokens_per_micro_batch=12)  # several micro-batches
    data = make_data([6, 3, 5], vocab=engine.base.vocab_size)
    engine.create_model("custom", lora=lora)
    engine.create_model("ce", lora=lora)
    handle, forward = engine.forward_keep_graph(
        "custom",
        [EngineDatum(d.input_tokens, {"target_tokens": d.loss_fn_inputs["target_tokens"]}) for d in data],
    )
    assert forward.metrics["loss:sum"] == 0.0
    grads = [torch.randn(o["logprobs"].shape) for o in forward.outputs]
    metrics = engine.backward_from_logprob_grads(handle, grads)
    ce_data = [
        EngineDatum(d.input_tokens, {"target_tokens": d.loss_fn_inputs["target_tokens"], "weights": -g})
        for d, g in zip(data, grads, strict=True)
    ]
    ce = engine.forward_backward("ce", ce_data, "cross_entropy")
    assert metrics["loss:sum"] == pytest.approx(ce.metrics["loss:sum"], rel=1e-5)
    for a, b in zip(forward.outputs, ce.outputs, strict=True):
        torch.testing.assert_close(a["logprobs"], b["logprobs"], atol=1e-6, rtol=1e-6)
    assert_same_tensors(
        engine.accumulated_gradients("custom"), engine.accumulated_gradients("ce"), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(NotFoundError):  # a graph is used once
        engine.backward_from_logprob_grads(handle, grads)
    for model_id in ("custom", "ce"):
        engine.delete_model(model_id)


def test_kept_graph_rejects_bad_grads_and_stale_steps_without_touching_gradients(training_engine):
    engine = training_engine
    engine.create_model("m", lora=SPEC)
    data = make_data([4, 2], vocab=engine.base.vocab_size)
    handle, forward = engine.forward_keep_graph("m", data)
    with pytest.raises(UserInputError) as wrong_shape:
        engine.backward_from_logprob_grads(handle, [torch.zeros(4), torch.zeros(3)])
    assert wrong_shape.value.datum_index == 1
    with pytest.raises(UserInputError):
        engine.backward_from_logprob_grads(handle, [torch.zeros(4), torch.tensor([1.0, float("nan")])])
    assert engine.accumulated_gradients("m") == {}
    engine.optim_step("m", ADAM)
    with pytest.raises(UserInputError, match="optimizer step"):
        engine.backward_from_logprob_grads(handle, [torch.zeros(4), torch.zeros(2)])
    engine.release_graph(handle)
    with pytest.raises(NotFoundError):
        engine.backward_from_logprob_grads(handle, [torch.zeros(4), torch.zeros(2)])


@pytest.mark.parametrize("lora", [SPEC, None], ids=["lora", "full"])
def test_same_seed_same_inputs_same_results(small_base, lora):
    runs = []
    for _ in range(2):
        engine = TrainingEngine(small_base, max_tokens_per_micro_batch=10)
        engine.create_model("m", lora=lora)
        losses = []
        for step in range(2):
            data = make_data([5, 3, 4], vocab=small_base.vocab_size, seed=step)
            losses.append(engine.forward_backward("m", data, "ppo").metrics["loss:sum"])
            engine.optim_step("m", ADAM)
        runs.append((losses, weights_of(engine, "m")))
        engine.delete_model("m")
    assert runs[0][0] == runs[1][0]
    assert_same_tensors(runs[0][1], runs[1][1])


def test_lifecycle_errors(training_engine):
    engine = training_engine
    engine.create_model("m", lora=SPEC)
    with pytest.raises(ConflictError):
        engine.create_model("m", lora=None)
    for call in (
        lambda: engine.forward("nope", make_data([2], vocab=8), "cross_entropy"),
        lambda: engine.optim_step("nope", ADAM),
        lambda: engine.export_state("nope", include_optimizer=True),
        lambda: engine.delete_model("nope"),
    ):
        with pytest.raises(NotFoundError):
            call()


def test_bf16_base_model_trains_fp32_adapters(small_base):
    """A bf16 base keeps fp32 LoRA weights and moments; its logprobs stay close to the fp32 model's."""
    from tether.engine.model_loading import load_base_model

    bf16_base = load_base_model(str(small_base.path), dtype="bfloat16")
    data = make_data([6, 4], vocab=small_base.vocab_size)
    logprobs = {}
    for name, base in (("fp32", small_base), ("bf16", bf16_base)):
        engine = TrainingEngine(base)
        engine.create_model("m", lora=SPEC)
        logprobs[name] = engine.forward_backward("m", data, "cross_entropy").outputs
        engine.optim_step("m", ADAM)
        state = engine.export_state("m", include_optimizer=True)
        assert all(t.dtype == torch.float32 for t in state.weights.values())
        assert all(t.dtype == torch.float32 for t in state.optimizer.values())
        assert any(t.abs().sum() > 0 for n, t in state.weights.items() if n.endswith("lora_B"))
        engine.delete_model("m")
    for a, b in zip(logprobs["fp32"], logprobs["bf16"], strict=True):
        torch.testing.assert_close(a["logprobs"], b["logprobs"], atol=0.05, rtol=0.05)
