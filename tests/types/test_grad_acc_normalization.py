"""`grad_accumulation_normalization` on the optim_step body and in the SDK's keyword: values, names, errors."""

from __future__ import annotations

import enum

import pytest

from tether.types.errors import UserInputError
from tether.types.wire import GradAccNormalization, OptimStepRequest, dump_wire, parse_wire


@pytest.mark.parametrize(
    ("sent", "read"),
    [
        (None, None),
        ("num_loss_tokens", GradAccNormalization.NUM_LOSS_TOKENS),
        ("NUM_SEQUENCES", GradAccNormalization.NUM_SEQUENCES),
        ("none", GradAccNormalization.NONE),
    ],
)
def test_the_body_reads_values_and_names(sent, read):
    body = {"model_id": "m", "adam_params": {"learning_rate": 0.1}}
    if sent is not None:
        body["grad_accumulation_normalization"] = sent
    request = parse_wire(OptimStepRequest, body)
    assert request.grad_accumulation_normalization == read


def test_an_unknown_value_names_the_field():
    with pytest.raises(UserInputError) as error:
        parse_wire(OptimStepRequest, {"model_id": "m", "grad_accumulation_normalization": "mean"})
    assert error.value.field == "grad_accumulation_normalization"


def test_absent_is_not_sent_so_the_body_stays_tinker_shaped():
    assert "grad_accumulation_normalization" not in dump_wire(OptimStepRequest(model_id="m"))
    sent = dump_wire(
        OptimStepRequest(model_id="m", grad_accumulation_normalization=GradAccNormalization.NUM_LOSS_TOKENS)
    )
    assert sent["grad_accumulation_normalization"] == "num_loss_tokens"


class FireworksLike(enum.Enum):
    """Another package's enum with the same values (what Fireworks' SDK users pass)."""

    NUM_LOSS_TOKENS = "num_loss_tokens"


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        (None, GradAccNormalization.NONE),
        (FireworksLike.NUM_LOSS_TOKENS, GradAccNormalization.NUM_LOSS_TOKENS),
        ("Num_Sequences", GradAccNormalization.NUM_SEQUENCES),
        (GradAccNormalization.NONE, GradAccNormalization.NONE),
    ],
)
def test_coerce_accepts_enums_values_and_names(value, mode):
    assert GradAccNormalization.coerce(value) is mode


@pytest.mark.parametrize("value", ["tokens", 3, object()])
def test_coerce_refuses_anything_else_naming_the_field(value):
    with pytest.raises(UserInputError) as error:
        GradAccNormalization.coerce(value)
    assert error.value.field == "grad_accumulation_normalization"
