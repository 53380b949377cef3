"""tether's SDK sends what stable_reinforce needs: `record_stability_info` on its sampling clients'
requests and provenance spans on datums (its own `Datum.with_provenance`, or a `tinker` Datum's)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tether.types.data import Datum, ModelInput, PromptProvenanceSpan, SampledProvenanceSpan, SamplingParams
from tether.types.errors import UserInputError

PROMPT = list(b"7*6=")


def rl_datum(sequence) -> Datum:
    sampled = list(sequence.tokens)
    ob = len(PROMPT) - 1
    datum = Datum(
        model_input=ModelInput.from_ints(PROMPT + sampled[:-1]),
        loss_fn_inputs={
            "target_tokens": [0] * ob + sampled,
            "logprobs": [0.0] * ob + list(sequence.logprobs),
            "advantages": [0.0] * ob + [1.0] * len(sampled),
        },
    )
    sid = sequence.sequence_id
    return datum.with_provenance(
        model_input=[
            PromptProvenanceSpan(sequence_id=sid, length=len(PROMPT)),
            SampledProvenanceSpan(sequence_id=sid, length=len(sampled) - 1),
        ],
        loss_fn_inputs=[
            PromptProvenanceSpan(sequence_id=sid, offset=1, length=ob),
            SampledProvenanceSpan(sequence_id=sid, length=len(sampled)),
        ],
    )


def test_stable_reinforce_with_the_tether_sdk(service):
    training = service.create_lora_training_client(base_model="tether/tiny-qwen3", rank=2).result()
    sampler = training.save_weights_and_get_sampling_client(record_stability_info=True).result()
    assert pickle.loads(pickle.dumps(sampler)).record_stability_info
    params = SamplingParams(max_tokens=4, stop=[], seed=3)
    sequence = (
        sampler.sample(ModelInput.from_ints(PROMPT), num_samples=1, sampling_params=params)
        .result()
        .sequences[0]
    )
    assert sequence.sequence_id
    result = training.forward_backward([rl_datum(sequence)], "stable_reinforce").result()
    assert np.isfinite(result.metrics["loss:sum"])
    # without stability info, the same datum is refused, naming the span's sequence
    plain = training.save_weights_and_get_sampling_client().result()
    other = (
        plain.sample(ModelInput.from_ints(PROMPT), num_samples=1, sampling_params=params)
        .result()
        .sequences[0]
    )
    with pytest.raises(UserInputError) as info:
        training.forward_backward([rl_datum(other)], "stable_reinforce").result()
    assert "sequence_id" in str(info.value) and "record_stability_info" in str(info.value)


def test_with_provenance_checks_the_tiling_and_tinker_spans_convert():
    datum = Datum(model_input=ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3, 4]})
    with pytest.raises(UserInputError) as info:
        datum.with_provenance(
            model_input=[PromptProvenanceSpan(sequence_id="s:0", length=2)],
            loss_fn_inputs=[SampledProvenanceSpan(sequence_id="s:0", length=3)],
        )
    assert info.value.field == "model_input_spans"
    tinker = pytest.importorskip("tinker")
    theirs = tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3, 4]}
    ).with_provenance(
        model_input=[tinker.types.PromptProvenanceSpan(sequence_id="s:0", length=3)],
        loss_fn_inputs=[tinker.types.SampledProvenanceSpan(sequence_id="s:0", offset=1, length=3)],
    )
    ours = Datum.coerce(theirs)
    assert ours.model_input_spans == [PromptProvenanceSpan(sequence_id="s:0", length=3)]
    assert ours.loss_fn_input_spans == [SampledProvenanceSpan(sequence_id="s:0", offset=1, length=3)]
