"""Every SDK method against a real tether server (in a thread) serving the tiny default model."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from tests.client.conftest import MODEL
from tether.client import ServiceClient, TrainingClient
from tether.types.data import AdamParams, Datum, ModelInput, SamplingParams
from tether.types.errors import NotFoundError, UserInputError


def sft_datum(text: str) -> Datum:
    tokens = list(text.encode())
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def test_training_sampling_and_checkpoints(service: ServiceClient) -> None:
    tc: TrainingClient = service.create_lora_training_client(MODEL, rank=4, seed=0).result()
    assert tc.get_info().model_id == tc.model_id
    data = [sft_datum("hello tether"), sft_datum("one pass")]

    before = tc.forward(data, "cross_entropy").result()
    lps = [out["logprobs"].to_numpy() for out in before.loss_fn_outputs]
    assert [lp.shape[0] for lp in lps] == [d.model_input.length for d in data]
    assert before.metrics["loss:sum"] == pytest.approx(-sum(float(lp.sum()) for lp in lps), rel=1e-5)

    # Pipelined: all steps submitted before any result is read.
    futures = [
        (tc.forward_backward(data, "cross_entropy"), tc.optim_step(AdamParams(learning_rate=1e-2)))
        for _ in range(4)
    ]
    losses = [fb.result().metrics["loss:sum"] for fb, _ in futures]
    assert all(math.isfinite(opt.result().metrics["grad_norm:mean"]) for _, opt in futures)
    assert losses[0] == pytest.approx(before.metrics["loss:sum"], rel=1e-5)
    assert losses[-1] < losses[0]
    after = tc.forward(data, "cross_entropy").result()

    state = tc.save_state("ckpt").result()
    assert state.path == f"tinker://{tc.model_id}/weights/ckpt"
    sampler = tc.save_weights_for_sampler("samp").result()
    assert sampler.path == f"tinker://{tc.model_id}/sampler_weights/samp"

    # The sampler scores a prompt exactly as the trainer does.
    sc = tc.save_weights_and_get_sampling_client().result()
    prompt_tokens = data[0].model_input.to_ints() + [data[0].loss_fn_inputs["target_tokens"].tolist()[-1]]
    prompt_lps = sc.compute_logprobs(ModelInput.from_ints(prompt_tokens)).result()
    assert prompt_lps[0] is None
    np.testing.assert_allclose(prompt_lps[1:], after.loss_fn_outputs[0]["logprobs"].tolist(), atol=1e-4)
    resp = sc.sample(
        ModelInput.from_ints(prompt_tokens), 2, SamplingParams(max_tokens=5, seed=1, stop=[])
    ).result()
    assert len(resp.sequences) == 2 and all(
        len(s.tokens) == 5 and len(s.logprobs) == 5 for s in resp.sequences
    )
    assert all(s.stop_reason == "length" for s in resp.sequences)

    # A pickled copy (e.g. for a rollout worker process) samples the same weights.
    copy = pickle.loads(pickle.dumps(sc))
    np.testing.assert_allclose(
        copy.compute_logprobs(ModelInput.from_ints(prompt_tokens)).result()[1:], prompt_lps[1:], atol=1e-6
    )

    sc2 = service.create_sampling_client(model_path=sampler.path).result()
    assert sc2.get_base_model() == MODEL
    np.testing.assert_allclose(
        sc2.compute_logprobs(ModelInput.from_ints(prompt_tokens)).result()[1:], prompt_lps[1:], atol=1e-5
    )

    # Resume: the weights come back exactly.
    for resumed in (
        service.create_training_client_from_state(state.path).result(),
        service.create_training_client_from_state_with_optimizer(state.path).result(),
    ):
        again = resumed.forward(data, "cross_entropy").result()
        for a, b in zip(again.loss_fn_outputs, after.loss_fn_outputs, strict=True):
            np.testing.assert_allclose(a["logprobs"].to_numpy(), b["logprobs"].to_numpy(), atol=1e-6)

    # The tokenizer is the local byte-level one (token id == byte value), loaded offline.
    assert tc.get_tokenizer().encode("hi", add_special_tokens=False) == [104, 105]

    rest = service.create_rest_client()
    names = {c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert {"weights/ckpt", "sampler_weights/samp"} <= names
    run = rest.get_training_run(tc.model_id).result()
    assert run.base_model == MODEL and run.is_lora and run.lora_rank == 4
    rest.delete_checkpoint_from_tinker_path(sampler.path).result()
    names = {c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert "sampler_weights/samp" not in names
    caps = service.get_server_capabilities()
    assert MODEL in [m.model_name for m in caps.supported_models]


def test_server_errors_arrive_typed(service: ServiceClient) -> None:
    tc = service.create_lora_training_client(MODEL, rank=2).result()
    with pytest.raises(UserInputError) as info:
        tc.forward([sft_datum("abc")], "no_such_loss").result()
    assert info.value.category == "user" and info.value.field == "loss_fn"
    with pytest.raises(NotFoundError):
        service.create_training_client_from_state(f"tinker://{tc.model_id}/weights/missing").result()
    bad_token = Datum(
        model_input=ModelInput.from_ints([1, 99999]),
        loss_fn_inputs={"target_tokens": [1, 2], "weights": [1, 1]},
    )
    with pytest.raises(UserInputError) as info:
        tc.forward_backward([sft_datum("fine"), bad_token], "cross_entropy").result()
    assert info.value.datum_index == 1 and info.value.field, "the server's field and datum arrive typed"
    with pytest.raises(UserInputError) as info:
        service.create_lora_training_client(MODEL, rank=-3).result()
    assert info.value.field is not None and "rank" in info.value.field
    tc.forward_backward([sft_datum("still usable")], "cross_entropy").result()


def test_full_fine_tuning_with_rank_zero(service: ServiceClient) -> None:
    tc = service.create_lora_training_client(MODEL, rank=0).result()
    assert tc.get_info().is_lora is False
    data = [sft_datum("full weights")]
    first = tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    tc.optim_step(AdamParams(learning_rate=1e-3)).result()
    assert tc.forward(data, "cross_entropy").result().metrics["loss:sum"] < first


def test_rest_client_runs_checkpoints_ttl_sessions_samplers(service: ServiceClient) -> None:
    tc = service.create_lora_training_client(MODEL, rank=2, seed=1).result()
    saved = tc.save_weights_for_sampler("rest-ckpt").result()
    state = tc.save_state("rest-state", ttl_seconds=7200).result()
    rest = service.create_rest_client()

    by_id = {c.checkpoint_id: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert by_id["sampler_weights/rest-ckpt"].tinker_path == saved.path
    assert by_id["weights/rest-state"].checkpoint_type == "training"
    assert by_id["weights/rest-state"].expires_at is not None
    rest.set_checkpoint_ttl_from_tinker_path(state.path, None).result()
    by_id = {c.checkpoint_id: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert by_id["weights/rest-state"].expires_at is None
    user_paths = {c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints}
    assert {saved.path, state.path} <= user_paths

    runs = rest.list_training_runs(limit=100).result()
    assert tc.model_id in {r.training_run_id for r in runs.training_runs}
    assert rest.get_training_run_by_tinker_path(saved.path).result().training_run_id == tc.model_id
    info = rest.get_weights_info_by_tinker_path(state.path).result()
    assert info.base_model == MODEL and info.is_lora and info.lora_rank == 2

    session_id = tc.model_id.split(":train:")[0]
    assert session_id in rest.list_sessions(limit=100).result().sessions
    assert tc.model_id in rest.get_session(session_id).result().training_run_ids
    sc = service.create_sampling_client(model_path=saved.path).result()
    sampler = rest.get_sampler(sc.sampling_session_id).result()
    assert sampler.base_model == MODEL and sampler.model_path == saved.path
    with pytest.raises(UserInputError, match="tinker_path"):
        rest.delete_checkpoint_from_tinker_path("tinker://only/two")
