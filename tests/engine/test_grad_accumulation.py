"""optim_step's gradient-accumulation normalisation and the response_tokens metric, against plain PyTorch.

Two forward_backward calls of a raw token-sum loss, then a step that divides by the loss tokens (or
sequences) accumulated, must update the weights exactly as one step on the mean loss does. Adam's
first step barely depends on the gradients' scale, so these steps use a large `eps` (and clipping)
to make the scale visible in the weights.
"""

from __future__ import annotations

import pytest
import torch
from engine_reference import add_lora_hooks, make_data, plain_model, reference_logprobs, reference_loss

from tether.engine.lora import LoraSpec
from tether.engine.optimizer import ModelOptimizer, NonFiniteStepError
from tether.engine.training_engine import AdamWParams, EngineDatum, LossRequest, TrainingEngine
from tether.types.errors import UserInputError

SPEC = LoraSpec(rank=4, alpha=8.0, seed=3)
ADAM = AdamWParams(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1.0, weight_decay=0.1)
TOL = {"atol": 1e-6, "rtol": 1e-6}


def _batches(vocab: int) -> list[list[EngineDatum]]:
    """Two requests with some zero weights (prompt-like positions) and some zero advantages."""
    batches = [make_data([7, 3], vocab=vocab, seed=1), make_data([5, 6, 2], vocab=vocab, seed=2)]
    for batch in batches:
        for datum in batch:
            datum.loss_fn_inputs["weights"][:2] = 0.0
            datum.loss_fn_inputs["advantages"][-1:] = 0.0
    return batches


def _nonzero(batches: list[list[EngineDatum]], key: str) -> int:
    return sum(int((d.loss_fn_inputs[key] != 0).sum()) for batch in batches for d in batch)


def _randomize_lora(engine: TrainingEngine, model_id: str) -> None:
    state = engine.export_state(model_id, include_optimizer=False)
    gen = torch.Generator().manual_seed(7)
    for name, tensor in state.weights.items():
        if name.endswith(".lora_B"):
            tensor.copy_(0.05 * torch.randn(tensor.shape, generator=gen))
    engine.import_state(model_id, state, include_optimizer=False)


def _reference_step(engine, lora, batches, loss_fn, divisor, params) -> tuple[dict[str, torch.Tensor], float]:
    """Plain PyTorch: the summed loss of every batch divided by `divisor`, backward, clip, torch AdamW."""
    model = plain_model(engine.base.path)
    if lora:
        leaves = add_lora_hooks(model, engine.export_state("m", include_optimizer=False).weights, SPEC.scale)
    else:
        leaves = dict(model.named_parameters())
    total = sum(
        reference_loss(loss_fn, reference_logprobs(model, d), d.loss_fn_inputs, {})
        for batch in batches
        for d in batch
    )
    (total / divisor).backward()
    with_grad = [t for t in leaves.values() if t.grad is not None]
    norm = float(torch.nn.utils.get_total_norm([t.grad for t in with_grad]))
    if params.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(with_grad, params.grad_clip_norm)
    optimizer = torch.optim.AdamW(
        with_grad,
        lr=params.learning_rate,
        betas=(params.beta1, params.beta2),
        eps=params.eps,
        weight_decay=params.weight_decay,
    )
    optimizer.step()
    return {n: t.detach() for n, t in leaves.items() if t.grad is not None}, norm


def _engine_weights(engine: TrainingEngine) -> dict[str, torch.Tensor]:
    return engine.export_state("m", include_optimizer=False).weights


@pytest.mark.parametrize("clip", [0.0, 2.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("mode", ["num_loss_tokens", "num_sequences"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_two_calls_and_a_normalised_step_equal_one_step_on_the_mean_loss(training_engine, lora, mode, clip):
    """`clip` 2: clip at twice the normalised gradients' norm, which clips only un-normalised ones
    (normalising after clipping would differ)."""
    engine = training_engine
    engine.create_model("m", lora=SPEC if lora else None)
    if lora:
        _randomize_lora(engine, "m")
    batches = _batches(engine.base.vocab_size)
    divisor = _nonzero(batches, "weights") if mode == "num_loss_tokens" else sum(map(len, batches))
    _, norm = _reference_step(engine, lora, batches, "cross_entropy", divisor, ADAM)
    params = AdamWParams(**{**ADAM.__dict__, "grad_clip_norm": clip * norm})
    expected, expected_norm = _reference_step(engine, lora, batches, "cross_entropy", divisor, params)
    raw, _ = _reference_step(engine, lora, batches, "cross_entropy", 1, params)
    for batch in batches:
        engine.forward_backward("m", batch, "cross_entropy")
    metrics = engine.optim_step("m", params, normalization=mode)
    assert metrics["grad_accumulation_divisor:mean"] == divisor
    assert metrics["grad_norm:mean"] == pytest.approx(expected_norm, rel=1e-5)
    weights = _engine_weights(engine)
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    # the normalisation is visible: the raw-sum step lands elsewhere
    assert any(not torch.allclose(expected[n], raw[n], atol=1e-5) for n in expected)
    assert engine.accumulated_counts("m") == (0, 0)


@pytest.mark.parametrize("normalization", [None, "none"])
def test_none_is_the_raw_sum_step(training_engine, normalization):
    engine = training_engine
    engine.create_model("m", lora=SPEC)
    _randomize_lora(engine, "m")
    batches = _batches(engine.base.vocab_size)
    expected, expected_norm = _reference_step(engine, True, batches, "cross_entropy", 1, ADAM)
    for batch in batches:
        engine.forward_backward("m", batch, "cross_entropy")
    kwargs = {} if normalization is None else {"normalization": normalization}
    metrics = engine.optim_step("m", ADAM, **kwargs)
    assert set(metrics) == {"grad_norm:mean", "learning_rate:mean"}
    assert metrics["grad_norm:mean"] == pytest.approx(expected_norm, rel=1e-5)
    weights = _engine_weights(engine)
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, **TOL)


def test_policy_gradient_losses_count_nonzero_advantages(training_engine):
    engine = training_engine
    engine.create_model("m", lora=SPEC)
    _randomize_lora(engine, "m")
    batches = _batches(engine.base.vocab_size)
    divisor = _nonzero(batches, "advantages")
    assert divisor != _nonzero(batches, "weights")  # the datums carry both; the loss reads advantages
    expected, _ = _reference_step(engine, True, batches, "importance_sampling", divisor, ADAM)
    for batch in batches:
        result = engine.forward_backward("m", batch, "importance_sampling")
        assert "response_tokens:sum" not in result.metrics  # cross_entropy's metric only
    assert engine.accumulated_counts("m") == (divisor, 5)
    engine.optim_step("m", ADAM, normalization="num_loss_tokens")
    weights = _engine_weights(engine)
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, **TOL)


def test_response_tokens_counts_positions_with_a_nonzero_weight(training_engine):
    engine = training_engine
    engine.create_model("m", lora=SPEC)
    data = make_data([6, 4], vocab=engine.base.vocab_size, seed=5)
    data[0].loss_fn_inputs["weights"][:3] = 0.0
    result = engine.forward_backward("m", data, "cross_entropy")
    assert result.metrics["response_tokens:sum"] == 7.0
    # mean NLL = loss:sum / response_tokens with 0/1 weights
    ones = make_data([6, 4], vocab=engine.base.vocab_size, seed=5)
    for datum in ones:
        datum.loss_fn_inputs["weights"] = (torch.arange(datum.input_tokens.shape[0]) >= 2).float()
    out = engine.forward("m", ones, "cross_entropy")
    nll = -torch.cat([o["logprobs"][2:] for o in out.outputs])
    assert out.metrics["response_tokens:sum"] == 6.0
    assert out.metrics["loss:sum"] / out.metrics["response_tokens:sum"] == pytest.approx(
        float(nll.mean()), rel=1e-5
    )
    # (N, K) targets: a position counts once if any of its K weights is non-zero
    soft = make_data([5], vocab=engine.base.vocab_size, seed=6, soft_k=3)
    soft[0].loss_fn_inputs["weights"][:2] = 0.0
    soft[0].loss_fn_inputs["weights"][2, 1:] = 0.0
    assert engine.forward("m", soft, "cross_entropy").metrics["response_tokens:sum"] == 3.0
    # forward-only calls never count; the backward above did
    assert engine.accumulated_counts("m") == (7, 2)


def test_custom_loss_backward_counts_nonzero_logprob_grads(training_engine):
    engine = training_engine
    engine.create_model("m", lora=SPEC)
    data = make_data([5, 3], vocab=engine.base.vocab_size, seed=8)
    handle, _ = engine.forward_keep_graph("m", data)
    grads = [torch.tensor([0.0, 0.5, -1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 1.0])]
    engine.backward_from_logprob_grads(handle, grads)
    assert engine.accumulated_counts("m") == (4, 2)


def test_fused_passes_count_per_model(training_engine):
    engine = training_engine
    engine.create_model("a", lora=SPEC)
    engine.create_model("b", lora=LoraSpec(rank=2, alpha=4.0, seed=4))
    batches = _batches(engine.base.vocab_size)
    results = engine.forward_backward_fused(
        [
            LossRequest("a", batches[0], "cross_entropy"),
            LossRequest("b", batches[1], "importance_sampling"),
        ]
    )
    assert results[0].metrics["response_tokens:sum"] == _nonzero([batches[0]], "weights")
    assert engine.accumulated_counts("a") == (_nonzero([batches[0]], "weights"), 2)
    assert engine.accumulated_counts("b") == (_nonzero([batches[1]], "advantages"), 3)


def test_a_bad_mode_changes_nothing(training_engine):
    engine = training_engine
    engine.create_model("m", lora=SPEC)
    _randomize_lora(engine, "m")
    batches = _batches(engine.base.vocab_size)
    for batch in batches:
        engine.forward_backward("m", batch, "cross_entropy")
    before = engine.accumulated_gradients("m")
    counts = engine.accumulated_counts("m")
    weights = _engine_weights(engine)
    with pytest.raises(UserInputError) as err:
        engine.optim_step("m", ADAM, normalization="mean")  # type: ignore[arg-type]
    assert err.value.field == "grad_accumulation_normalization"
    assert engine.accumulated_counts("m") == counts
    after = engine.accumulated_gradients("m")
    for name, grad in before.items():
        assert torch.equal(after[name], grad)
    for name, value in _engine_weights(engine).items():
        assert torch.equal(value, weights[name])
    assert engine.model_info("m")["optimizer_steps"] == 0


def test_a_refused_update_keeps_gradients_and_counts_for_the_retry():
    params = {"w": torch.nn.Parameter(torch.ones(3))}
    opt = ModelOptimizer(params)
    opt.import_moments(  # restored moments whose ratio m / sqrt(v) is astronomically large
        {"exp_avg.w": torch.full((3,), 1e37), "exp_avg_sq.w": torch.zeros(3), "step.w": torch.tensor(5.0)},
        num_steps=5,
    )
    params["w"].grad = torch.tensor([4.0, -8.0, 2.0])
    opt.accumulate(loss_tokens=4, sequences=2)
    with pytest.raises(NonFiniteStepError):
        opt.step(AdamWParams(learning_rate=10.0), normalization="num_loss_tokens")
    assert opt.accumulated_counts() == (4, 2)
    assert torch.equal(params["w"].grad, torch.tensor([4.0, -8.0, 2.0]))
    opt.import_moments({}, num_steps=5)  # saner state: the retry divides the kept gradients by the kept count
    metrics = opt.step(AdamWParams(learning_rate=0.0), normalization="num_loss_tokens")
    assert metrics["grad_accumulation_divisor:mean"] == 4.0
    assert metrics["grad_norm:mean"] == pytest.approx(float(torch.tensor([1.0, -2.0, 0.5]).norm()))
    assert opt.accumulated_counts() == (0, 0)


def test_discarded_nonfinite_gradients_take_their_counts_along():
    params = {"w": torch.nn.Parameter(torch.ones(2))}
    opt = ModelOptimizer(params)
    params["w"].grad = torch.tensor([float("inf"), 1.0])
    opt.accumulate(loss_tokens=3, sequences=1)
    with pytest.raises(NonFiniteStepError):
        opt.step(AdamWParams(), normalization="num_sequences")
    assert opt.accumulated_counts() == (0, 0) and params["w"].grad is None


def test_skip_mode_drops_gradients_and_counts(small_base):
    engine = TrainingEngine(small_base, on_nonfinite="skip")
    try:
        engine.create_model("m", lora=SPEC)
        data = make_data([4], vocab=engine.base.vocab_size)
        data[0].loss_fn_inputs["weights"].fill_(1e38)
        engine.forward_backward("m", data, "cross_entropy")
        metrics = engine.optim_step("m", ADAM, normalization="num_loss_tokens")
        assert metrics["skipped_nonfinite:sum"] == 1.0
        assert engine.accumulated_counts("m") == (0, 0)
        assert engine.accumulated_gradients("m") == {}
    finally:
        engine.delete_model("m")


def test_load_state_starts_with_no_counts(training_engine):
    engine = training_engine
    engine.create_model("m", lora=SPEC)
    engine.forward_backward("m", make_data([4], vocab=engine.base.vocab_size), "cross_entropy")
    state = engine.export_state("m", include_optimizer=True)
    engine.import_state("m", state, include_optimizer=True)  # gradients are not state: nor are their counts
    assert engine.accumulated_counts("m") == (0, 0)
