"""The official tinker==0.38.0 SDK, unmodified, against `tether serve`: training and checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from tether.types.paths import parse_checkpoint_path  # noqa: E402

BASE = "tether/tiny-qwen3"
TEXTS = ["hello tether", "the quick brown fox"]


def _datum(text: str) -> types.Datum:
    ids = list(text.encode())  # the default model's tokenizer is byte-level
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
    )


BATCH = [_datum(t) for t in TEXTS]
ADAM = types.AdamParams(learning_rate=5e-3)


def _step(client, data=BATCH, loss_fn="cross_entropy") -> float:
    fwd = client.forward_backward(data, loss_fn)
    opt = client.optim_step(ADAM)  # submitted before either result is read, as the SDK intends
    loss = fwd.result().metrics["loss:sum"]
    opt.result()
    return loss


@pytest.fixture(scope="module")
def lora_client(service_client):
    return service_client.create_lora_training_client(base_model=BASE, rank=4, seed=0).result()


def test_get_info_names_model_and_local_tokenizer(lora_client):
    info = lora_client.get_info()
    assert info.model_data.model_name == BASE
    assert info.is_lora and info.lora_rank == 4
    tokenizer = lora_client.get_tokenizer()
    assert tokenizer.encode("hi", add_special_tokens=False) == list(b"hi")


def test_loss_falls_on_a_fixed_batch(service_client):
    client = service_client.create_lora_training_client(base_model=BASE, rank=4, seed=1).result()
    losses = [_step(client) for _ in range(4)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] * 0.9, losses


def test_forward_matches_cross_entropy_reference_and_does_not_train(lora_client):
    first = lora_client.forward(BATCH, "cross_entropy").result()
    again = lora_client.forward(BATCH, "cross_entropy").result()
    total = 0.0
    for datum, out in zip(BATCH, first.loss_fn_outputs, strict=True):
        logprobs = out["logprobs"].to_torch()
        assert logprobs.shape == (datum.model_input.length,)
        assert (logprobs <= 0).all()
        total += float(-(logprobs * datum.loss_fn_inputs["weights"].to_torch()).sum())
    assert first.metrics["loss:sum"] == pytest.approx(total, rel=1e-5)
    assert again.metrics["loss:sum"] == pytest.approx(first.metrics["loss:sum"], rel=1e-6)


def test_forward_logprobs_equal_compute_logprobs(service_client):
    client = service_client.create_lora_training_client(base_model=BASE, rank=4, seed=2).result()
    _step(client)
    ids = list(TEXTS[1].encode())
    forward = client.forward([_datum(TEXTS[1])], "cross_entropy").result()
    train_lp = forward.loss_fn_outputs[0]["logprobs"].to_numpy()
    sampler = client.save_weights_and_get_sampling_client().result()
    prompt_lp = sampler.compute_logprobs(types.ModelInput.from_ints(ids)).result()
    assert prompt_lp[0] is None and len(prompt_lp) == len(ids)
    np.testing.assert_allclose(np.array(prompt_lp[1:], dtype=np.float32), train_lp, atol=2e-4)


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "cispo", "dro"])
def test_rl_losses_run_and_report_loss(lora_client, loss_fn):
    ids = list(TEXTS[0].encode())
    n = len(ids) - 1
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={
            "target_tokens": ids[1:],
            "logprobs": [-5.0] * n,
            "advantages": [1.0 if i % 2 else -0.5 for i in range(n)],
        },
    )
    config = {"beta": 0.05} if loss_fn == "dro" else None
    out = lora_client.forward([datum], loss_fn, config).result()
    assert math.isfinite(out.metrics["loss:sum"])
    assert out.loss_fn_outputs[0]["logprobs"].to_numpy().shape == (n,)


def test_forward_backward_custom_equals_cross_entropy(service_client):
    custom = service_client.create_lora_training_client(base_model=BASE, rank=4, seed=3).result()
    plain = service_client.create_lora_training_client(base_model=BASE, rank=4, seed=3).result()

    def ce(data, logprobs_list):
        loss = sum(
            -(lp * d.loss_fn_inputs["weights"].to_torch()).sum()
            for d, lp in zip(data, logprobs_list, strict=True)
        )
        return loss, {"ce:sum": float(loss)}

    out = custom.forward_backward_custom(BATCH, ce).result()
    custom.optim_step(ADAM).result()
    reference = _step(plain)
    assert out.metrics["loss:sum"] == pytest.approx(reference, rel=1e-5)
    after_custom = custom.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]
    after_plain = plain.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]
    assert after_custom == pytest.approx(after_plain, rel=1e-4)


def test_resumed_client_continues_exactly(service_client, rest_client):
    client = service_client.create_lora_training_client(base_model=BASE, rank=4, seed=4).result()
    _step(client)
    _step(client)
    path = client.save_state("mid").result().path
    assert path == f"tinker://{client.model_id}/weights/mid"
    loss_at_save = client.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]
    _step(client)
    never_stopped = client.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]

    with_optimizer = service_client.create_training_client_from_state_with_optimizer(path).result()
    assert with_optimizer.get_info().is_lora and with_optimizer.get_info().lora_rank == 4
    assert _step(with_optimizer) == pytest.approx(loss_at_save, rel=1e-5)
    resumed = with_optimizer.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]
    assert resumed == pytest.approx(never_stopped, rel=1e-4)

    weights_only = service_client.create_training_client_from_state(path).result()
    assert weights_only.forward(BATCH, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(
        loss_at_save, rel=1e-5
    )
    _step(weights_only)
    fresh_optimizer = weights_only.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]
    assert fresh_optimizer != pytest.approx(never_stopped, rel=1e-6)  # moments were reset

    client.load_state_with_optimizer(path).result()  # the deprecated in-place load rewinds the same client
    assert client.forward(BATCH, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(
        loss_at_save, rel=1e-5
    )
    _step(client)
    assert client.forward(BATCH, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(
        never_stopped, rel=1e-4
    )


def test_full_fine_tuning_client_trains_saves_and_samples(service_client):
    client = service_client.create_lora_training_client(base_model=BASE, rank=0).result()
    assert not client.get_info().is_lora
    losses = [_step(client) for _ in range(2)]
    assert losses[1] < losses[0]
    prompt = types.ModelInput.from_ints(list(b"hello"))
    live = client.save_weights_and_get_sampling_client().result().compute_logprobs(prompt).result()
    state_path = client.save_state("full").result().path
    sampler_path = client.save_weights_for_sampler("full-sampler").result().path
    for path in (state_path, sampler_path):
        sampler = service_client.create_sampling_client(model_path=path).result()
        assert sampler.compute_logprobs(prompt).result() == pytest.approx(live, abs=1e-5)
    resumed = service_client.create_training_client_from_state_with_optimizer(state_path).result()
    assert not resumed.get_info().is_lora


def test_named_sampler_checkpoint_samples_like_the_ephemeral_one(service_client, lora_client):
    _step(lora_client)
    saved = lora_client.save_weights_for_sampler("for-sampling").result()
    assert saved.path == f"tinker://{lora_client.model_id}/sampler_weights/for-sampling"
    from_path = service_client.create_sampling_client(model_path=saved.path).result()
    ephemeral = lora_client.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(list(b"the quick"))
    assert from_path.compute_logprobs(prompt).result() == pytest.approx(
        ephemeral.compute_logprobs(prompt).result(), abs=1e-5
    )
    assert from_path.get_base_model() == BASE
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=7)
    a = from_path.sample(prompt, 2, params).result()
    b = ephemeral.sample(prompt, 2, params).result()
    assert len(a.sequences) == 2 and [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert all(len(s.tokens) <= 6 and len(s.logprobs) == len(s.tokens) for s in a.sequences)


def test_base_model_sampling_client(service_client):
    sampler = service_client.create_sampling_client(base_model=BASE).result()
    prompt = types.ModelInput.from_ints(list(b"abc"))
    out = sampler.sample(prompt, 3, types.SamplingParams(max_tokens=4, temperature=0.0)).result()
    assert len(out.sequences) == 3
    assert out.sequences[0].tokens == out.sequences[1].tokens  # greedy
    topk = sampler.sample(
        prompt,
        1,
        types.SamplingParams(max_tokens=2, temperature=0.0),
        topk_sample_logprobs=3,
        topk_prompt_logprobs=2,
        include_prompt_logprobs=True,
    ).result()
    sequence = topk.sequences[0]
    assert len(sequence.topk_logprobs) == len(sequence.tokens)
    first = sequence.topk_logprobs[0]
    assert len(first) == 3 and first[0][0] == sequence.tokens[0]  # greedy picks the most likely token
    assert first[0][1] == pytest.approx(sequence.logprobs[0], abs=1e-5)
    assert topk.topk_prompt_logprobs[0] is None and len(topk.topk_prompt_logprobs[1]) == 2
    with_prompt = sampler.sample(
        prompt, 1, types.SamplingParams(max_tokens=1), include_prompt_logprobs=True
    ).result()
    assert with_prompt.prompt_logprobs[0] is None and len(with_prompt.prompt_logprobs) == 3
    assert with_prompt.prompt_logprobs[1:] == pytest.approx(
        sampler.compute_logprobs(prompt).result()[1:], abs=1e-5
    )


def test_save_weights_external_writes_hugging_face_adapter(lora_client, rest_client):
    out = lora_client.save_weights_external("hf").result()
    assert out.path == f"tinker://{lora_client.model_id}/external_weights/hf"
    urls = rest_client.get_external_weights_urls(out.path).result()
    assert "adapter_config.json" in urls.urls and "adapter_model.safetensors" in urls.urls


def test_rest_runs_checkpoints_ttl_and_delete(server, service_client, rest_client):
    from datetime import timedelta

    from tether.server.catalogue import utcnow
    from tether.server.sessions import expire_checkpoints

    client = service_client.create_lora_training_client(
        base_model=BASE, rank=4, seed=5, user_metadata={"k": "v"}
    ).result()
    keep = client.save_state("keep").result().path
    doomed = client.save_state("doomed").result().path
    expiring = client.save_weights_for_sampler("expiring").result().path

    run = rest_client.get_training_run(client.model_id).result()
    assert run.base_model == BASE and run.is_lora and run.lora_rank == 4 and run.user_metadata == {"k": "v"}
    assert rest_client.get_training_run_by_tinker_path(keep).result().training_run_id == client.model_id
    runs = rest_client.list_training_runs(limit=100).result()
    assert client.model_id in [r.training_run_id for r in runs.training_runs]

    listed = {c.tinker_path for c in rest_client.list_checkpoints(client.model_id).result().checkpoints}
    assert {keep, doomed, expiring} <= listed
    assert keep in {c.tinker_path for c in rest_client.list_user_checkpoints(limit=1000).result().checkpoints}

    info = rest_client.get_weights_info_by_tinker_path(keep).result()
    assert info.base_model == BASE and info.is_lora and info.lora_rank == 4

    rest_client.delete_checkpoint_from_tinker_path(doomed).result()
    rest_client.set_checkpoint_ttl_from_tinker_path(expiring, 3600).result()
    rest_client.publish_checkpoint_from_tinker_path(keep).result()
    rest_client.unpublish_checkpoint_from_tinker_path(keep).result()
    listed = {c.tinker_path: c for c in rest_client.list_checkpoints(client.model_id).result().checkpoints}
    assert set(listed) == {keep, expiring} and listed[expiring].expires_at is not None
    state = server.app.state.tether
    expire_checkpoints(state, now=utcnow() + timedelta(minutes=30))  # not yet due
    assert len(rest_client.list_checkpoints(client.model_id).result().checkpoints) == 2
    expire_checkpoints(state, now=utcnow() + timedelta(hours=2))
    listed = {c.tinker_path for c in rest_client.list_checkpoints(client.model_id).result().checkpoints}
    assert listed == {keep}
    assert not state.checkpoints.directory(run.model_owner, parse_checkpoint_path(expiring)).exists()
    with pytest.raises(tinker.NotFoundError):
        rest_client.get_training_run("sess-nope:train:0").result()


def test_sessions_and_samplers_are_listed(service_client, rest_client, lora_client):
    lora_client.save_weights_and_get_sampling_client().result()
    session_id = lora_client.model_id.split(":")[0]
    assert session_id in rest_client.list_sessions(limit=1000).result().sessions
    session = rest_client.get_session(session_id).result()
    assert lora_client.model_id in session.training_run_ids
    assert session.sampler_ids and all(s.startswith(f"{session_id}:sample:") for s in session.sampler_ids)
    assert rest_client.get_sampler(session.sampler_ids[-1]).result().base_model == BASE
    caps = rest_client.get_server_capabilities().result()
    assert BASE in [m.model_name for m in caps.supported_models]


def test_user_error_fails_the_future_and_leaves_the_model_usable(lora_client):
    before = lora_client.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]
    bad = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 9999]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
    )
    with pytest.raises(tinker.RequestFailedError) as info:
        lora_client.forward_backward([bad], "cross_entropy").result()
    assert "9999" in str(info.value) or "vocab" in str(info.value).lower()
    after = lora_client.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]
    assert after == pytest.approx(before, rel=1e-6)
    assert math.isfinite(_step(lora_client))


def test_torch_is_available_for_custom_losses():
    assert torch.tensor([1.0]).sum() == 1.0


def test_copy_weights_makes_a_loadable_copy_in_a_new_run(service_client, rest_client, lora_client):
    original = lora_client.save_state("to-copy").result().path
    copy = rest_client.copy_weights(original, "proj-archive").result()
    assert copy != original and copy.endswith("/weights/to-copy")
    copied_run = copy.split("/")[2]
    assert rest_client.get_training_run(copied_run).result().lora_rank == 4
    assert [c.tinker_path for c in rest_client.list_checkpoints(copied_run).result().checkpoints] == [copy]
    a = service_client.create_training_client_from_state(original).result()
    b = service_client.create_training_client_from_state(copy).result()
    assert a.forward(BATCH, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(
        b.forward(BATCH, "cross_entropy").result().metrics["loss:sum"], rel=1e-6
    )
    rest_client.delete_checkpoint_from_tinker_path(original).result()
    assert (
        rest_client.get_weights_info_by_tinker_path(copy).result().lora_rank == 4
    )  # the copy is independent
