"""The sampling engine end to end on a tiny model: greedy, seeds, stops, batching, adapters, limits."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from transformers import AutoTokenizer

from tether.engine.lora import LoraSpec, lora_layers
from tether.engine.sampling import SampleRequest, SamplingEngine
from tether.engine.sampling.kv_cache import BatchKVCache
from tether.types.errors import ConflictError, NotFoundError, OverloadedError, ServerError, UserInputError

PROMPTS = [list(b"Hello there"), list(b"a"), list(b"The quick brown fox jumps"), list(b"12345")]


def greedy(prompt, **kwargs) -> SampleRequest:
    return SampleRequest(prompt, temperature=0.0, **{"max_tokens": 12, **kwargs})


def random_lora(base, rank: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in lora_layers(base.model):
        tensors[f"{name}.lora_A"] = torch.randn(rank, layer.in_features, generator=generator) * 0.3
        tensors[f"{name}.lora_B"] = torch.randn(layer.out_features, rank, generator=generator) * 0.3
    return tensors


def test_greedy_equals_transformers_generate_token_for_token(engine, base):
    futures = [engine.submit(greedy(p, max_tokens=20)) for p in PROMPTS]
    for prompt, future in zip(PROMPTS, futures, strict=True):
        result = future.result(timeout=60)
        with torch.no_grad():
            expected = base.model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
        assert result.sequences[0].tokens == expected[0, len(prompt) :].tolist()


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(engine):
    request = SampleRequest(PROMPTS[0], num_samples=2, max_tokens=15, temperature=1.0, top_p=0.95, seed=123)
    alone = engine.submit(request).result(timeout=60)
    noise = [engine.submit(SampleRequest(p, max_tokens=25, temperature=1.0)) for p in PROMPTS]
    crowded = engine.submit(request).result(timeout=60)
    for future in noise:
        future.result(timeout=60)
    assert [s.tokens for s in alone.sequences] == [s.tokens for s in crowded.sequences]
    assert alone.sequences[0].tokens != alone.sequences[1].tokens
    other_seed = engine.submit(dataclasses.replace(request, seed=124)).result(timeout=60)
    assert [s.tokens for s in other_seed.sequences] != [s.tokens for s in alone.sequences]


def test_samples_share_one_prefill(engine, prefill_calls):
    result = engine.submit(SampleRequest(PROMPTS[2], num_samples=4, max_tokens=6, seed=1)).result(timeout=60)
    assert len(result.sequences) == 4 and prefill_calls == [tuple(PROMPTS[2])]


def test_stop_token_and_stop_string_end_the_sequence_inclusively(engine, base):
    free = engine.submit(greedy(PROMPTS[0], max_tokens=30, stop=[])).result(timeout=60).sequences[0]
    assert free.stop_reason == "length" and len(free.tokens) == 30
    position = next(i for i in range(3, 30) if free.tokens[i] not in free.tokens[:i])
    by_token = engine.submit(greedy(PROMPTS[0], max_tokens=30, stop=[free.tokens[position]])).result(
        timeout=60
    )
    assert by_token.sequences[0].tokens == free.tokens[: position + 1]
    assert by_token.sequences[0].stop_reason == "stop"
    assert by_token.sequences[0].logprobs == pytest.approx(free.logprobs[: position + 1], abs=1e-5)

    decode = AutoTokenizer.from_pretrained(base.tokenizer_path).decode
    end, stop_string = next(
        (end, bytes(free.tokens[end - n : end]).decode())
        for end in range(2, 30)
        for n in (2, 1)
        if all(32 <= t < 127 for t in free.tokens[end - n : end])
        and bytes(free.tokens[end - n : end]).decode() not in decode(free.tokens[: end - 1])
    )
    by_string = engine.submit(greedy(PROMPTS[0], max_tokens=30, stop=[stop_string])).result(timeout=60)
    assert by_string.sequences[0].tokens == free.tokens[:end]
    assert by_string.sequences[0].stop_reason == "stop"


def test_eos_stops_by_default_and_empty_stop_list_disables_it(base):
    probe = SamplingEngine(base)
    try:
        free = probe.submit(greedy(PROMPTS[3], max_tokens=10, stop=[])).result(timeout=60).sequences[0]
    finally:
        probe.close()
    eos = free.tokens[3]
    cut = free.tokens.index(eos) + 1
    engine = SamplingEngine(dataclasses.replace(base, eos_token_ids=[eos]))
    try:
        default = engine.submit(greedy(PROMPTS[3], max_tokens=10)).result(timeout=60).sequences[0]
        disabled = engine.submit(greedy(PROMPTS[3], max_tokens=10, stop=[])).result(timeout=60).sequences[0]
        other_stop = (
            engine.submit(greedy(PROMPTS[3], max_tokens=10, stop=[263])).result(timeout=60).sequences[0]
        )
    finally:
        engine.close()
    assert default.tokens == free.tokens[:cut] and default.stop_reason == "stop"
    assert disabled.tokens == free.tokens and disabled.stop_reason == "length"
    assert other_stop.tokens == free.tokens[:cut]  # EOS still stops when other stops are given


def test_short_request_is_not_held_back_by_a_long_one(engine):
    long = engine.submit(SampleRequest(PROMPTS[2], max_tokens=200, stop=[], temperature=1.0))
    time.sleep(0.05)
    short = engine.submit(greedy(PROMPTS[1], max_tokens=3))
    short.result(timeout=60)
    assert not long.done()
    assert len(long.result(timeout=60).sequences[0].tokens) == 200


def test_different_adapters_in_one_batch_each_see_their_own_weights(engine, base):
    engine.register_lora("lora-1", LoraSpec(rank=4, alpha=8), random_lora(base, 4, seed=1))
    engine.register_lora("lora-2", LoraSpec(rank=2, alpha=4), random_lora(base, 2, seed=2))
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in base.model.state_dict().items()}
    engine.register_full("full-1", state)
    weights = [None, "lora-1", "lora-2", "full-1"]
    alone = {}
    for weights_id in weights:
        alone[weights_id] = engine.submit(greedy(PROMPTS[0], max_tokens=16, weights_id=weights_id)).result(
            timeout=60
        )
    together = [engine.submit(greedy(PROMPTS[0], max_tokens=16, weights_id=w)) for w in weights * 2]
    for weights_id, future in zip(weights * 2, together, strict=True):
        result = future.result(timeout=60)
        assert result.sequences[0].tokens == alone[weights_id].sequences[0].tokens
        assert result.sequences[0].logprobs == pytest.approx(
            alone[weights_id].sequences[0].logprobs, abs=1e-4
        )
    distinct = {tuple(alone[w].sequences[0].tokens) for w in weights}
    assert len(distinct) == len(weights)


def sampler_adapters(base) -> set[str]:
    return {a for _, layer in lora_layers(base.model) for a in layer.adapters if a.startswith("sampling/")}


def test_unregistered_weights_finish_running_requests_then_are_dropped(engine, base):
    before = sampler_adapters(base)
    engine.register_lora("snap", LoraSpec(rank=2), random_lora(base, 2, seed=3))
    with pytest.raises(ConflictError):
        engine.register_lora("snap", LoraSpec(rank=2), random_lora(base, 2, seed=3))
    running = engine.submit(SampleRequest(PROMPTS[0], max_tokens=60, stop=[], weights_id="snap"))
    engine.unregister("snap")
    with pytest.raises(NotFoundError):
        engine.submit(greedy(PROMPTS[0], weights_id="snap"))
    assert len(running.result(timeout=60).sequences[0].tokens) == 60
    assert sampler_adapters(base) == before
    engine.register_lora(
        "snap", LoraSpec(rank=2), random_lora(base, 2, seed=4)
    )  # a newer snapshot, same name
    engine.unregister("snap")
    with pytest.raises(NotFoundError):
        engine.unregister("snap")


def test_close_removes_the_engines_adapters_from_the_shared_base(base):
    engine = SamplingEngine(base)
    engine.register_lora("a", LoraSpec(rank=2), random_lora(base, 2, seed=6))
    assert sampler_adapters(base)
    engine.close()
    assert not sampler_adapters(base)


def test_bad_registrations_are_user_errors(engine, base):
    tensors = random_lora(base, 2, seed=5)
    name = next(iter(tensors))
    with pytest.raises(UserInputError) as err:
        engine.register_lora("x", LoraSpec(rank=3), tensors)
    assert err.value.field == "tensors"
    with pytest.raises(UserInputError):
        engine.register_lora("x", LoraSpec(rank=2), {"nope.lora_A": tensors[name]})
    with pytest.raises(UserInputError) as err:
        engine.register_full("y", {"model.nonexistent.weight": torch.zeros(1)})
    assert err.value.field == "state_dict"
    with pytest.raises(NotFoundError):
        engine.submit(greedy(PROMPTS[0], weights_id="x"))


BAD_REQUESTS = [
    (dict(prompt_tokens=[]), "prompt"),
    (dict(prompt_tokens=[1, 264]), "prompt"),
    (dict(prompt_tokens=[1, -1]), "prompt"),
    (dict(prompt_tokens=list(range(200)) + [1] * 56), "prompt"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=250), "max_tokens"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(num_samples=0), "num_samples"),
    (dict(stop=[1, "x"]), "stop"),
    (dict(topk_prompt_logprobs=-1), "topk_prompt_logprobs"),
    (dict(topk_sample_logprobs=-2), "topk_sample_logprobs"),
]


def test_bad_input_is_refused_at_submit_and_running_requests_continue(engine):
    good = greedy(PROMPTS[2], max_tokens=40, stop=[])
    expected = engine.submit(good).result(timeout=60)
    running = engine.submit(good)
    for overrides, field in BAD_REQUESTS:
        fields = {"prompt_tokens": PROMPTS[0], "max_tokens": 8, **overrides}
        with pytest.raises(UserInputError) as err:
            engine.submit(SampleRequest(**fields))
        assert err.value.field == field, overrides
    assert running.result(timeout=60).sequences[0].tokens == expected.sequences[0].tokens
    assert engine.queue_depth == 0 and engine.running_sequences == 0


def test_kv_budget_makes_work_wait_and_a_full_queue_is_overload(base):
    engine = SamplingEngine(base, kv_cache_budget_tokens=100, max_waiting_requests=1)
    try:
        with pytest.raises(UserInputError) as err:
            engine.submit(SampleRequest(PROMPTS[0], max_tokens=95))
        assert err.value.field == "max_tokens"
        first = engine.submit(SampleRequest(PROMPTS[0], max_tokens=80, stop=[]))  # reserves 91 of 100
        deadline = time.time() + 10
        while engine.running_sequences == 0 and time.time() < deadline:
            time.sleep(0.001)
        second = engine.submit(SampleRequest(PROMPTS[1], max_tokens=20, stop=[]))  # 21 more: must wait
        with pytest.raises(OverloadedError):
            engine.submit(SampleRequest(PROMPTS[1], max_tokens=5))
        assert engine.queue_depth == 1
        assert not second.done()
        first.result(timeout=60)
        assert len(second.result(timeout=60).sequences[0].tokens) == 20
    finally:
        engine.close()


def test_close_fails_waiting_and_running_requests(base):
    engine = SamplingEngine(base, kv_cache_budget_tokens=100)
    running = engine.submit(SampleRequest(PROMPTS[0], max_tokens=80, stop=[]))
    waiting = engine.submit(SampleRequest(PROMPTS[1], max_tokens=50, stop=[]))
    engine.close()
    for future in (running, waiting):
        if not future.done() or future.exception() is not None:
            assert future.exception(timeout=5) is not None
    with pytest.raises(Exception, match="closed"):
        engine.submit(greedy(PROMPTS[0]))


def test_a_failing_forward_fails_only_the_requests_it_carried(engine, base, monkeypatch):
    state = {k: v.clone() for k, v in base.model.state_dict().items()}
    engine.register_full("broken", state)
    entry = engine._weights.acquire("broken")  # white-box: reach the model the engine built
    engine._weights.release(entry)
    broken_model = entry.model

    def explode(*args, **kwargs):
        raise RuntimeError("device lost")

    expected = engine.submit(greedy(PROMPTS[0], max_tokens=30, stop=[])).result(timeout=60)
    healthy = engine.submit(greedy(PROMPTS[0], max_tokens=30, stop=[]))
    monkeypatch.setattr(broken_model, "forward", explode)
    doomed = [engine.submit(greedy(p, weights_id="broken")) for p in PROMPTS]
    for future in doomed:
        with pytest.raises(ServerError, match="device lost"):
            future.result(timeout=60)
    assert healthy.result(timeout=60).sequences[0].tokens == expected.sequences[0].tokens
    assert engine.running_sequences == 0


def test_the_loop_survives_an_unexpected_error(engine, monkeypatch):
    real = BatchKVCache.append_rows
    calls = {"n": 0}

    def fail_once(self, joining):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("bug")
        return real(self, joining)

    monkeypatch.setattr(BatchKVCache, "append_rows", fail_once)
    with pytest.raises(ServerError, match="bug"):
        engine.submit(greedy(PROMPTS[0])).result(timeout=60)
    assert engine.running_sequences == 0
    assert len(engine.submit(greedy(PROMPTS[0], stop=[])).result(timeout=60).sequences[0].tokens) == 12


def test_a_request_cancelled_while_waiting_never_runs(base):
    engine = SamplingEngine(base, kv_cache_budget_tokens=100)
    try:
        first = engine.submit(SampleRequest(PROMPTS[0], max_tokens=80, stop=[]))
        waiting = engine.submit(SampleRequest(PROMPTS[1], max_tokens=50, stop=[]))
        assert waiting.cancel()
        first.result(timeout=60)
        after = engine.submit(SampleRequest(PROMPTS[1], max_tokens=50, stop=[]))
        assert len(after.result(timeout=60).sequences[0].tokens) == 50
        assert engine.running_sequences == 0 and engine.queue_depth == 0
    finally:
        engine.close()


def test_request_spellings_the_service_passes_through(engine, base):
    short_context = SamplingEngine(dataclasses.replace(base, max_context_length=len(PROMPTS[0]) + 5))
    try:  # max_tokens None = up to the context length
        result = short_context.submit(SampleRequest(PROMPTS[0], stop=[])).result(timeout=60)
        assert len(result.sequences[0].tokens) == 5 and result.sequences[0].stop_reason == "length"
    finally:
        short_context.close()
    big_seed = SampleRequest(PROMPTS[0], max_tokens=5, seed=2**64 - 1, num_samples=2)
    assert (
        engine.submit(big_seed).result(timeout=60).sequences
        == engine.submit(big_seed).result(timeout=60).sequences
    )
    negative_seed = engine.submit(SampleRequest(PROMPTS[0], max_tokens=5, seed=-(2**63))).result(timeout=60)
    assert len(negative_seed.sequences[0].tokens) == 5
    greedy_pair = engine.submit(greedy(PROMPTS[0], num_samples=3, max_tokens=6)).result(timeout=60)
    assert len({tuple(s.tokens) for s in greedy_pair.sequences}) == 1
