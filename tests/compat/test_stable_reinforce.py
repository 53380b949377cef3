"""stable_reinforce, gspo and reinforce through the official tinker SDK, as the cookbook sends them:
`record_stability_info` on sample requests, a `sequence_id` on every sampled sequence, provenance
spans on datums and `kl_coeff` in `loss_fn_config` (sent as `loss_fn_config_v2` too).

The server's loss is checked against the formula evaluated here in plain numpy, from the learner
logprobs the server returns and the sampler logprobs the sample response carried. Broken datums are
refused with a 400 that names the field and the datum, and the whole request is refused.
"""

from __future__ import annotations

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

BASE = "tether/tiny-qwen3"
PROMPT = list(b"2+3=")
PARAMS = types.SamplingParams(max_tokens=5, stop=[], seed=11, temperature=1.0)


@pytest.fixture(scope="module")
def client(service_client):
    return service_client.create_lora_training_client(base_model=BASE, rank=4, seed=0).result()


@pytest.fixture(scope="module")
def recorded(client):
    sampler = client.save_weights_and_get_sampling_client(record_stability_info=True).result()
    response = sampler.sample(
        types.ModelInput.from_ints(PROMPT), num_samples=2, sampling_params=PARAMS
    ).result()
    return response.sequences


def rl_datum(sequence, advantage: float, *, provenance: bool = True) -> types.Datum:
    """rl_loop's layout: input = prompt + sampled[:-1]; targets zero under the prompt."""
    sampled = list(sequence.tokens)
    ob_len = len(PROMPT) - 1
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(PROMPT + sampled[:-1]),
        loss_fn_inputs={
            "target_tokens": np.array([0] * ob_len + sampled, dtype=np.int64),
            "logprobs": np.array([0.0] * ob_len + list(sequence.logprobs), dtype=np.float32),
            "advantages": np.array([0.0] * ob_len + [advantage] * len(sampled), dtype=np.float32),
        },
    )
    if not provenance:
        return datum
    sid = sequence.sequence_id
    return datum.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=sid, length=len(PROMPT)),
            types.SampledProvenanceSpan(sequence_id=sid, length=len(sampled) - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=ob_len),
            types.SampledProvenanceSpan(sequence_id=sid, length=len(sampled)),
        ],
    )


def test_sampled_sequences_carry_distinct_ids(recorded):
    ids = [s.sequence_id for s in recorded]
    assert all(ids) and len(set(ids)) == len(ids)
    assert all(s.logprobs is not None and len(s.logprobs) == len(s.tokens) for s in recorded)


def test_stable_reinforce_matches_its_formula(client, recorded):
    data = [rl_datum(recorded[0], 1.0), rl_datum(recorded[1], -0.5)]
    config = {"kl_coeff": 0.3, "ratio_cap": 1.5}
    result = client.forward(data, "stable_reinforce", config).result()
    expected = 0.0
    for datum, out, seq in zip(data, result.loss_fn_outputs, recorded, strict=True):
        lp = np.asarray(out["logprobs"].tolist(), dtype=np.float64)
        sampled = slice(len(PROMPT) - 1, None)
        lp_s, q = lp[sampled], np.asarray(seq.logprobs, dtype=np.float64)
        adv = datum.loss_fn_inputs["advantages"].to_numpy()[sampled]
        ratio = np.exp(lp_s - q)
        expected += -(np.minimum(ratio, 1.5) * adv * lp_s).sum() + 0.3 * (ratio - 1 - (lp_s - q)).sum()
    assert result.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    trained = client.forward_backward(data, "stable_reinforce").result()  # the cookbook's call: no config
    assert np.isfinite(trained.metrics["loss:sum"])
    client.optim_step(types.AdamParams(learning_rate=1e-3)).result()


def test_gspo_and_reinforce_through_the_sdk(client, recorded):
    seq = recorded[0]
    datum = rl_datum(seq, 1.0, provenance=False)
    mask = (datum.loss_fn_inputs["advantages"].to_numpy() != 0).astype(np.float32)
    with_mask = types.Datum(
        model_input=datum.model_input,
        loss_fn_inputs={**datum.loss_fn_inputs, "sequence_ratio_mask": mask},
    )
    config = {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}
    gspo = client.forward([with_mask], "gspo", config).result()
    lp = np.asarray(gspo.loss_fn_outputs[0]["logprobs"].tolist(), dtype=np.float64)
    q = datum.loss_fn_inputs["logprobs"].to_numpy().astype(np.float64)
    s = np.exp((mask * (lp - q)).sum() / mask.sum())
    assert gspo.metrics["loss:sum"] == pytest.approx(-mask.sum() * min(s, np.clip(s, 0.5, 2.0)), rel=1e-4)
    reinforce = client.forward([datum], "reinforce").result()
    assert reinforce.metrics["loss:sum"] == pytest.approx(-(lp * mask).sum(), rel=1e-4)


def refusal(client, data) -> str:
    with pytest.raises(tinker.BadRequestError) as info:
        client.forward_backward(data, "stable_reinforce").result()
    return str(info.value)


def test_broken_provenance_is_refused_naming_the_field(client, recorded, service_client):
    good = rl_datum(recorded[0], 1.0)
    message = refusal(client, [good, rl_datum(recorded[1], 1.0, provenance=False)])
    assert "loss_fn_input_spans" in message and "datum 1" in message
    # spans that do not tile the input (built without with_provenance, which would check it)
    sid = recorded[0].sequence_id
    short = types.Datum(
        model_input=good.model_input,
        loss_fn_inputs=good.loss_fn_inputs,
        model_input_spans=[types.PromptProvenanceSpan(sequence_id=sid, length=len(PROMPT))],
        loss_fn_input_spans=good.loss_fn_input_spans,
    )
    message = refusal(client, [short])
    assert "model_input_spans" in message and "tile" in message
    # an advantage on a prompt position
    advantages = good.loss_fn_inputs["advantages"].to_numpy().copy()
    advantages[0] = 1.0
    shifted = types.Datum(
        model_input=good.model_input,
        loss_fn_inputs={**good.loss_fn_inputs, "advantages": advantages},
        model_input_spans=good.model_input_spans,
        loss_fn_input_spans=good.loss_fn_input_spans,
    )
    assert "loss_fn_inputs.advantages" in refusal(client, [shifted])


def test_sequences_sampled_without_stability_info_are_refused(client):
    sampler = client.save_weights_and_get_sampling_client().result()
    seq = sampler.sample(types.ModelInput.from_ints(PROMPT), num_samples=1, sampling_params=PARAMS).result()
    message = refusal(client, [rl_datum(seq.sequences[0], 1.0)])
    assert "record_stability_info" in message and "sequence_id" in message
