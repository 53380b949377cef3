"""Bad input raises a typed error naming the datum and field, and changes no state at all."""

from __future__ import annotations

import pytest
import torch
from engine_reference import make_data

from tether.engine.lora import LoraSpec
from tether.engine.training_engine import AdamWParams, EngineDatum
from tether.types.errors import NotFoundError, UserInputError


def snapshot(engine, model_id):
    state = engine.export_state(model_id, include_optimizer=True)
    return state.weights, state.optimizer, engine.accumulated_gradients(model_id), state.metadata


def assert_unchanged(before, after):
    for a, b in zip(before[:3], after[:3], strict=True):
        assert set(a) == set(b) and a  # non-empty: there is state to protect
        for name in a:
            assert torch.equal(a[name], b[name]), name
    assert before[3] == after[3]


def corrupt(datum: EngineDatum, **changes) -> EngineDatum:
    inputs = dict(datum.loss_fn_inputs)
    tokens = changes.pop("input_tokens", datum.input_tokens)
    for key, value in changes.items():
        if value is None:
            inputs.pop(key)
        else:
            inputs[key] = value
    return EngineDatum(tokens, inputs)


def nan_at_end(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[-1] = float("nan")
    return t


CASES = {
    "input token too large": (
        lambda d, v, c: corrupt(d, input_tokens=torch.tensor([0, v, 1, 2])),
        "model_input",
        "ppo",
    ),
    "negative input token": (
        lambda d, v, c: corrupt(d, input_tokens=torch.tensor([0, -1, 1, 2])),
        "model_input",
        "ppo",
    ),
    "target outside vocab": (
        lambda d, v, c: corrupt(d, target_tokens=torch.tensor([0, 1, v + 5, 2])),
        "loss_fn_inputs.target_tokens",
        "ppo",
    ),
    "targets too short": (
        lambda d, v, c: corrupt(d, target_tokens=torch.tensor([0, 1, 2])),
        "loss_fn_inputs.target_tokens",
        "ppo",
    ),
    "float targets": (
        lambda d, v, c: corrupt(d, target_tokens=torch.zeros(4)),
        "loss_fn_inputs.target_tokens",
        "ppo",
    ),
    "weights too long": (
        lambda d, v, c: corrupt(d, weights=torch.ones(5)),
        "loss_fn_inputs.weights",
        "cross_entropy",
    ),
    "longer than context": (
        lambda d, v, c: EngineDatum(
            torch.zeros(c + 1, dtype=torch.long),
            {"target_tokens": torch.zeros(c + 1, dtype=torch.long), "weights": torch.ones(c + 1)},
        ),
        "model_input",
        "cross_entropy",
    ),
    "empty input": (
        lambda d, v, c: corrupt(d, input_tokens=torch.tensor([], dtype=torch.long)),
        "model_input",
        "ppo",
    ),
    "nan weights": (
        lambda d, v, c: corrupt(d, weights=nan_at_end(d.loss_fn_inputs["weights"])),
        "loss_fn_inputs.weights",
        "cross_entropy",
    ),
    "inf advantages": (
        lambda d, v, c: corrupt(d, advantages=torch.tensor([0.0, float("inf"), 0.0, 0.0])),
        "loss_fn_inputs.advantages",
        "ppo",
    ),
    "nan sampling logprobs": (
        lambda d, v, c: corrupt(d, logprobs=nan_at_end(d.loss_fn_inputs["logprobs"])),
        "loss_fn_inputs.logprobs",
        "importance_sampling",
    ),
    "missing advantages": (lambda d, v, c: corrupt(d, advantages=None), "loss_fn_inputs.advantages", "cispo"),
    "missing weights": (lambda d, v, c: corrupt(d, weights=None), "loss_fn_inputs.weights", "cross_entropy"),
    "missing targets": (
        lambda d, v, c: corrupt(d, target_tokens=None),
        "loss_fn_inputs.target_tokens",
        "dro",
    ),
}


@pytest.fixture(params=[LoraSpec(rank=2, seed=0), None], ids=["lora", "full"])
def trained_model(request, training_engine):
    """A model with optimizer moments and accumulated gradients, i.e. every kind of state."""
    engine = training_engine
    engine.create_model("m", lora=request.param)
    data = make_data([4, 4, 4], vocab=engine.base.vocab_size)
    engine.forward_backward("m", data, "cross_entropy")
    engine.optim_step("m", AdamWParams(learning_rate=1e-2))
    engine.forward_backward("m", data, "cross_entropy")
    return engine, data


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("call", ["forward", "forward_backward"])
def test_bad_datum_names_index_and_field_and_changes_nothing(trained_model, case, call):
    engine, data = trained_model
    make_bad, field, loss_fn = CASES[case]
    bad = list(data)
    bad[1] = make_bad(data[1], engine.base.vocab_size, engine.base.max_context_length)
    config = {"beta": 0.1} if loss_fn == "dro" else None
    before = snapshot(engine, "m")
    with pytest.raises(UserInputError) as error:
        getattr(engine, call)("m", bad, loss_fn, config)
    assert error.value.datum_index == 1
    assert error.value.field == field
    assert "datum 1" in str(error.value)
    assert_unchanged(before, snapshot(engine, "m"))


@pytest.mark.parametrize(
    ("loss_fn", "config", "field"),
    [
        ("mse", None, "loss_fn"),
        ("ppo", {"clip_low": 0.5}, "loss_fn_config.clip_low"),
        ("ppo", {"clip_low_threshold": 1.5, "clip_high_threshold": 1.2}, "loss_fn_config.clip_low_threshold"),
        ("cispo", {"clip_high_threshold": float("nan")}, "loss_fn_config.clip_high_threshold"),
        ("dro", None, "loss_fn_config.beta"),
        ("cross_entropy", {"beta": 0.1}, "loss_fn_config.beta"),
    ],
)
def test_bad_loss_or_config_changes_nothing(trained_model, loss_fn, config, field):
    engine, data = trained_model
    before = snapshot(engine, "m")
    with pytest.raises(UserInputError) as error:
        engine.forward_backward("m", data, loss_fn, config)
    assert error.value.field == field
    assert_unchanged(before, snapshot(engine, "m"))


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (AdamWParams(learning_rate=-1.0), "adam_params.learning_rate"),
        (AdamWParams(beta1=1.0), "adam_params.beta1"),
        (AdamWParams(beta2=float("nan")), "adam_params.beta2"),
        (AdamWParams(eps=0.0), "adam_params.eps"),
        (AdamWParams(weight_decay=-0.1), "adam_params.weight_decay"),
        (AdamWParams(grad_clip_norm=float("inf")), "adam_params.grad_clip_norm"),
    ],
)
def test_bad_adam_params_change_nothing(trained_model, params, field):
    engine, _ = trained_model
    before = snapshot(engine, "m")
    with pytest.raises(UserInputError) as error:
        engine.optim_step("m", params)
    assert error.value.field == field
    assert_unchanged(before, snapshot(engine, "m"))


def test_unknown_model_and_empty_request(trained_model):
    engine, data = trained_model
    before = snapshot(engine, "m")
    with pytest.raises(NotFoundError):
        engine.forward_backward("other", data, "cross_entropy")
    with pytest.raises(UserInputError) as error:
        engine.forward_backward("m", [], "cross_entropy")
    assert error.value.field == "data"
    assert_unchanged(before, snapshot(engine, "m"))
