"""Provenance spans: tiling, and what stable_reinforce reads from the sampling records.

Every refusal names the field (down to the span) and the datum, and nothing is half-filled: a
datum that fails any check never reaches a loss.
"""

from __future__ import annotations

import numpy as np
import pytest

from tether.types.errors import UserInputError
from tether.types.proto_training import WireProvenanceSpan
from tether.types.provenance import SequenceRecord, check_datum_spans, resolve_sampled_inputs

PROMPT = np.array([10, 11, 12, 13], dtype=np.int64)
SAMPLED = np.array([20, 21, 22], dtype=np.int64)
SAMPLED_LP = np.array([-0.5, -1.5, -2.5], dtype=np.float32)
RECORDS = {"req:0": SequenceRecord(prompt=PROMPT, tokens=SAMPLED, logprobs=SAMPLED_LP)}


def span(kind: str, length: int, offset: int = 0, sequence_id: str = "req:0") -> WireProvenanceSpan:
    return WireProvenanceSpan(kind=kind, sequence_id=sequence_id, offset=offset, length=length)  # type: ignore[arg-type]


def rl_datum(advantage: float = 1.0):
    """The cookbook's single-turn layout: input = prompt + sampled[:-1], targets shifted by one
    (the prompt's targets are filled with zeros, as rl_loop does)."""
    tokens = np.concatenate([PROMPT, SAMPLED[:-1]])
    n_prompt_targets = len(PROMPT) - 1
    inputs = {
        "target_tokens": np.concatenate([np.zeros(n_prompt_targets, np.int64), SAMPLED]),
        "logprobs": np.zeros(len(tokens), np.float32),
        "advantages": np.array([0.0] * n_prompt_targets + [advantage] * len(SAMPLED), np.float32),
    }
    model_spans = [span("prompt", len(PROMPT)), span("sampled", len(SAMPLED) - 1)]
    loss_spans = [span("prompt", n_prompt_targets, offset=1), span("sampled", len(SAMPLED))]
    return tokens, inputs, model_spans, loss_spans


def resolve(tokens, inputs, model_spans, loss_spans, records=RECORDS):
    return resolve_sampled_inputs(tokens, inputs, model_spans, loss_spans, records.get, datum_index=3)


def test_recorded_logprobs_and_the_sampled_mask_are_filled_in():
    tokens, inputs, model_spans, loss_spans = rl_datum()
    inputs["logprobs"][:] = 7.0  # whatever the client sent, the record wins
    out = resolve(tokens, inputs, model_spans, loss_spans)
    np.testing.assert_array_equal(out["logprobs"], [0, 0, 0, -0.5, -1.5, -2.5])
    np.testing.assert_array_equal(out["sampled_mask"], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(out["target_tokens"], inputs["target_tokens"])
    assert out["logprobs"].dtype == np.float32 and out["sampled_mask"].dtype == np.float32


def error_of(*args, **kwargs) -> UserInputError:
    with pytest.raises(UserInputError) as info:
        resolve(*args, **kwargs)
    assert info.value.datum_index == 3
    return info.value


def test_missing_provenance_is_refused_naming_the_field():
    tokens, inputs, _, _ = rl_datum()
    err = error_of(tokens, inputs, None, None)
    assert err.field == "loss_fn_input_spans" and "provenance" in str(err)


@pytest.mark.parametrize(
    ("which", "spans", "field"),
    [
        ("model", [span("prompt", 4), span("sampled", 1)], "model_input_spans"),  # covers 5 of 6
        ("loss", [span("prompt", 3, offset=1), span("sampled", 4)], "loss_fn_input_spans"),  # 7 of 6
        ("model", [span("prompt", 4), span("sampled", 2, sequence_id="")], "model_input_spans.1.sequence_id"),
        ("loss", [span("prompt", 3, offset=-1), span("sampled", 3)], "loss_fn_input_spans.0.offset"),
    ],
)
def test_spans_that_do_not_tile_are_refused(which, spans, field):
    tokens, inputs, model_spans, loss_spans = rl_datum()
    if which == "model":
        model_spans = spans
    else:
        loss_spans = spans
    assert error_of(tokens, inputs, model_spans, loss_spans).field == field


def test_spans_come_as_a_pair_for_every_loss():
    with pytest.raises(UserInputError) as info:
        check_datum_spans([span("prompt", 2)], None, input_length=2, target_length=2, datum_index=0)
    assert info.value.field == "loss_fn_input_spans"
    check_datum_spans(None, None, input_length=2, target_length=2, datum_index=0)


def test_unknown_or_foreign_sequences_are_refused():
    tokens, inputs, model_spans, loss_spans = rl_datum()
    loss_spans[1] = span("sampled", 3, sequence_id="req:7")
    err = error_of(tokens, inputs, model_spans, loss_spans)
    assert err.field == "loss_fn_input_spans.1.sequence_id" and "record_stability_info" in str(err)


def test_tokens_that_differ_from_the_record_are_refused():
    tokens, inputs, model_spans, loss_spans = rl_datum()
    tokens = tokens.copy()
    tokens[5] = 99  # an input token the sampled run claims
    err = error_of(tokens, inputs, model_spans, loss_spans)
    assert err.field == "model_input_spans.1" and "token 99" in str(err)
    tokens, inputs, model_spans, loss_spans = rl_datum()
    inputs["target_tokens"] = inputs["target_tokens"].copy()
    inputs["target_tokens"][-1] = 98
    assert error_of(tokens, inputs, model_spans, loss_spans).field == "loss_fn_input_spans.1"


def test_runs_past_the_end_of_the_record_are_refused():
    tokens, inputs, model_spans, loss_spans = rl_datum()
    model_spans = [span("prompt", 3, offset=2), span("sampled", 3)]
    assert "past the end" in str(error_of(tokens, inputs, model_spans, loss_spans))


def test_advantages_off_the_sampled_tokens_are_refused():
    tokens, inputs, model_spans, loss_spans = rl_datum()
    inputs["advantages"] = inputs["advantages"].copy()
    inputs["advantages"][1] = 0.5
    err = error_of(tokens, inputs, model_spans, loss_spans)
    assert err.field == "loss_fn_inputs.advantages" and "position 1" in str(err)


def test_two_dimensional_targets_are_refused():
    tokens, inputs, model_spans, loss_spans = rl_datum()
    inputs["target_tokens"] = np.stack([inputs["target_tokens"]] * 2, axis=1)
    assert error_of(tokens, inputs, model_spans, loss_spans).field == "loss_fn_inputs.target_tokens"
