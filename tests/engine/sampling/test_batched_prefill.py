"""Batched prefill: prompts admitted together run in one forward pass and answer exactly as alone.

References: `prefill` of each prompt alone and a plain full forward (model runner level); at engine
level, the same requests run one at a time on an engine without prompt reuse: tokens equal, prompt
logprobs within 1e-5, sampled logprobs within 1e-5 relative (fp32, CPU). Summation order differs
between batch shapes, and this deliberately peaked model amplifies it along a generation (about
1e-6 per ten tokens from a padded prefill, as much again from batched decoding).
"""

from __future__ import annotations

import functools
from concurrent.futures import Future

import pytest
import torch

from tether.engine.lora import LoraSpec, lora_layers
from tether.engine.sampling import SampleRequest, SampleResult, SamplingEngine
from tether.engine.sampling.kv_cache import BatchKVCache
from tether.engine.sampling.model_runner import PrefillPrompt, decode, prefill, prefill_batch
from tether.types.errors import ServerError

TOLERANCE = 1e-5
PROMPTS = [
    list(b"The quick brown fox jumps over"),
    list(b"a"),
    list(b"Hello there"),
    list(b"12345"),
    list(b"Batched prefill left-pads"),
]


def random_lora(base, rank: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in lora_layers(base.model):
        tensors[f"{name}.lora_A"] = torch.randn(rank, layer.in_features, generator=generator) * 0.3
        tensors[f"{name}.lora_B"] = torch.randn(layer.out_features, rank, generator=generator) * 0.3
    return tensors


def submit_together(engine: SamplingEngine, requests: list[SampleRequest]) -> list[Future[SampleResult]]:
    """Queue every request before the engine's loop can admit any (white-box: hold its lock), so
    they are admitted, and prefilled, in one step."""
    with engine._cond:
        return [engine.submit(r) for r in requests]


def one_at_a_time(engine: SamplingEngine, requests: list[SampleRequest]) -> list[SampleResult]:
    return [engine.submit(r).result(timeout=120) for r in requests]


def assert_same(batched: SampleResult, alone: SampleResult) -> None:
    assert len(batched.sequences) == len(alone.sequences)
    for got, expected in zip(batched.sequences, alone.sequences, strict=True):
        assert got.tokens == expected.tokens
        assert got.stop_reason == expected.stop_reason
        assert got.logprobs == pytest.approx(expected.logprobs, rel=TOLERANCE, abs=TOLERANCE)
        if expected.topk_logprobs is None:
            assert got.topk_logprobs is None
        else:
            assert got.topk_logprobs is not None
            for got_row, expected_row in zip(got.topk_logprobs, expected.topk_logprobs, strict=True):
                assert [t for t, _ in got_row] == [t for t, _ in expected_row]
                assert [v for _, v in got_row] == pytest.approx([v for _, v in expected_row], abs=TOLERANCE)
    if alone.prompt_logprobs is None:
        assert batched.prompt_logprobs is None
    else:
        assert batched.prompt_logprobs is not None
        assert batched.prompt_logprobs[0] is None and alone.prompt_logprobs[0] is None
        assert batched.prompt_logprobs[1:] == pytest.approx(alone.prompt_logprobs[1:], abs=TOLERANCE)
    if alone.topk_prompt_logprobs is None:
        assert batched.topk_prompt_logprobs is None
    else:
        assert batched.topk_prompt_logprobs is not None
        for got_row, expected_row in zip(
            batched.topk_prompt_logprobs[1:], alone.topk_prompt_logprobs[1:], strict=True
        ):
            assert got_row is not None and expected_row is not None
            assert [t for t, _ in got_row] == [t for t, _ in expected_row]
            assert [v for _, v in got_row] == pytest.approx([v for _, v in expected_row], abs=TOLERANCE)


# --- the model runner ---------------------------------------------------------------------------
def test_a_padded_batch_prefill_equals_each_prompt_alone_and_decodes_on(base):
    engine = SamplingEngine(base)  # registers the adapters on the shared base's LoRA layers
    try:
        engine.register_lora("a", LoraSpec(rank=2, alpha=4), random_lora(base, 2, seed=1))
        adapter = engine._weights.acquire("a").adapter_id  # white-box: the private adapter id
        prompts = [
            PrefillPrompt(PROMPTS[0], None, include_prompt_logprobs=True, topk_prompt_logprobs=3),
            PrefillPrompt(PROMPTS[1], adapter, include_prompt_logprobs=True),
            PrefillPrompt(PROMPTS[2], adapter, topk_prompt_logprobs=2),
            PrefillPrompt(PROMPTS[3], None),
        ]
        batch = prefill_batch(base.model, prompts)
        alone = [
            prefill(
                base.model,
                p.adapter_id,
                p.tokens,
                include_prompt_logprobs=p.include_prompt_logprobs,
                topk_prompt_logprobs=p.topk_prompt_logprobs,
            )
            for p in prompts
        ]
        cache = batch[0].cache
        assert all(out.cache is cache and out.row == row for row, out in enumerate(batch))
        assert cache.row_lengths == [len(p.tokens) for p in prompts]
        for row, (got, expected) in enumerate(zip(batch, alone, strict=True)):
            assert torch.allclose(got.last_logits, expected.last_logits, atol=TOLERANCE)
            assert got.prompt_logprobs == (
                None
                if expected.prompt_logprobs is None
                else pytest.approx(expected.prompt_logprobs, abs=TOLERANCE)
            )
            assert (got.topk_prompt_logprobs is None) == (expected.topk_prompt_logprobs is None)
            own = got.detached().cache
            assert own.num_rows == 1 and own.length == len(prompts[row].tokens)
            for layer, keys in enumerate(expected.cache.keys):
                assert torch.allclose(own.keys[layer], keys[:, :, : expected.cache.length], atol=TOLERANCE)

        # Decode on from the padded cache, every row its own adapter, against a plain full forward.
        sequences = [
            list(p.tokens) + [int(out.last_logits.argmax())] for p, out in zip(prompts, batch, strict=True)
        ]
        for _ in range(3):
            logits = decode(base.model, cache, [s[-1] for s in sequences], [p.adapter_id for p in prompts])
            for row, sequence in enumerate(sequences):
                if prompts[row].adapter_id is None:
                    with torch.no_grad():
                        expected_logits = base.model(input_ids=torch.tensor([sequence])).logits[0, -1]
                    assert torch.allclose(logits[row], expected_logits.float(), atol=1e-4)
                sequence.append(int(logits[row].argmax()))
    finally:
        engine.close()


def test_padding_columns_are_finite_and_rows_join_with_their_own_repeat_counts(base):
    batch = prefill_batch(base.model, [PrefillPrompt(PROMPTS[0]), PrefillPrompt(PROMPTS[3])])
    cache = batch[0].cache
    used = [t[:, :, : cache.length] for t in (*cache.keys, *cache.values)]  # spare capacity is unset
    assert all(bool(torch.isfinite(t).all()) for t in used)
    group = BatchKVCache()
    group.append_rows([(cache, [0, 3])])  # the long prompt's samples all finished at their first token
    assert group.row_lengths == [len(PROMPTS[3])] * 3 and group.length == len(PROMPTS[3])
    with pytest.raises(ValueError, match="repeat counts"):
        group.append_rows([(cache, [1])])


# --- the engine -----------------------------------------------------------------------------------
@pytest.fixture()
def engines(base):
    """A batching engine (any padding in one batch) and a reference run one request at a time."""
    batched = SamplingEngine(base, prefill_forward_cost_tokens=float("inf"))
    generator = torch.Generator().manual_seed(3)
    full_weights = {
        k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in base.model.state_dict().items()
    }
    alone = SamplingEngine(base, prompt_cache_tokens=None)
    for engine in (batched, alone):
        engine.register_lora("lora-1", LoraSpec(rank=4, alpha=8), random_lora(base, 4, seed=1))
        engine.register_lora("lora-2", LoraSpec(rank=2, alpha=4), random_lora(base, 2, seed=2))
        engine.register_full("full-1", full_weights)
    yield batched, alone
    batched.close()
    alone.close()


def mixed_requests(alone: SamplingEngine) -> list[SampleRequest]:
    """Mixed prompt lengths, base, two adapters and full weights, 1-4 samples, sampling settings, stops, lengths.

    The greedy requests get a stop token and a stop string taken from their own free-running output
    (run on `alone`), so both kinds of stop certainly fire."""
    free_1 = alone.submit(
        SampleRequest(PROMPTS[1], max_tokens=9, temperature=0.0, stop=[], weights_id="lora-1")
    ).result(timeout=60)
    free_5 = alone.submit(
        SampleRequest(PROMPTS[0], max_tokens=30, temperature=0.0, stop=[], weights_id="lora-2")
    ).result(timeout=60)
    stop_token = free_1.sequences[0].tokens[3]
    stop_string = chr(next(t for t in free_5.sequences[0].tokens[2:] if 32 <= t < 127))
    return [
        SampleRequest(PROMPTS[0], num_samples=4, max_tokens=14, temperature=1.0, seed=1, stop=[]),
        SampleRequest(PROMPTS[1], max_tokens=9, temperature=0.0, stop=[stop_token], weights_id="lora-1"),
        SampleRequest(
            PROMPTS[2], num_samples=3, max_tokens=20, temperature=0.8, top_p=0.9, seed=2, weights_id="lora-2"
        ),
        SampleRequest(
            PROMPTS[3], num_samples=2, max_tokens=12, temperature=1.0, top_k=5, seed=3, stop=[ord("4")]
        ),
        SampleRequest(
            PROMPTS[4],
            num_samples=2,
            max_tokens=16,
            temperature=1.0,
            seed=4,
            include_prompt_logprobs=True,
            topk_prompt_logprobs=3,
            topk_sample_logprobs=2,
            weights_id="lora-1",
        ),
        SampleRequest(PROMPTS[0], max_tokens=30, temperature=0.0, stop=[stop_string], weights_id="lora-2"),
        SampleRequest(
            PROMPTS[2], num_samples=2, max_tokens=8, temperature=1.0, seed=5, include_prompt_logprobs=True
        ),
        SampleRequest(PROMPTS[3], num_samples=2, max_tokens=10, temperature=1.0, seed=6, weights_id="full-1"),
        SampleRequest(PROMPTS[0], max_tokens=10, temperature=0.0, weights_id="full-1"),
    ]


def test_requests_arriving_together_are_prefilled_in_one_pass_and_answer_as_alone(engines, prefill_calls):
    batched, alone = engines
    requests = mixed_requests(alone)
    prefill_calls.batch_sizes.clear()
    together = [f.result(timeout=120) for f in submit_together(batched, requests)]
    # Per model one forward for the prompts without prompt logprobs, one for those with (all logits).
    assert sorted(prefill_calls.batch_sizes) == [2, 2, 5]
    prefill_calls.batch_sizes.clear()
    reference = one_at_a_time(alone, requests)
    assert prefill_calls.batch_sizes == [1] * len(requests)
    for got, expected in zip(together, reference, strict=True):
        assert_same(got, expected)
    assert together[1].sequences[0].stop_reason == "stop" and together[5].sequences[0].stop_reason == "stop"
    assert together[0].sequences[0].stop_reason == "length"
    assert len({tuple(s.tokens) for s in together[0].sequences}) == 4  # each sample its own seed


def test_a_group_sent_as_separate_requests_shares_one_prefill(engines, prefill_calls):
    batched, alone = engines
    group = [
        SampleRequest(PROMPTS[0], max_tokens=10, temperature=1.0, seed=s, stop=[], weights_id="lora-1")
        for s in range(4)
    ]
    others = [SampleRequest(p, max_tokens=10, temperature=1.0, seed=9, stop=[]) for p in PROMPTS[1:4]]
    requests = group + others
    together = [f.result(timeout=120) for f in submit_together(batched, requests)]
    assert prefill_calls.batch_sizes == [4]  # the group's prompt once, plus three others
    assert [r.prompt_cache_hit_tokens for r in together[:4]] == [0] + [len(PROMPTS[0])] * 3
    for got, expected in zip(together, one_at_a_time(alone, requests), strict=True):
        assert_same(got, expected)


def test_padding_is_bounded_by_splitting_very_different_lengths(base, prefill_calls):
    engine = SamplingEngine(base, prefill_forward_cost_tokens=10.0)
    try:
        long, short = list(range(1, 61)), [7, 8, 9, 10, 11]
        requests = [
            SampleRequest(p, max_tokens=3, temperature=0.0) for p in (long, short, short[:4], long[:58])
        ]
        for future in submit_together(engine, requests):
            future.result(timeout=60)
    finally:
        engine.close()
    assert sorted(prefill_calls.batch_sizes) == [2, 2]  # 60 & 58 together, 5 & 4 together


def test_a_prompt_whose_forward_fails_fails_alone(engines, base, monkeypatch):
    batched, alone = engines
    poison = 255
    real_forward = base.model.forward

    @functools.wraps(real_forward)
    def forward(*args, input_ids, **kwargs):
        if input_ids.shape[1] > 1 and bool((input_ids == poison).any()):
            raise RuntimeError("poisoned prompt")
        return real_forward(*args, input_ids=input_ids, **kwargs)

    requests = [
        SampleRequest(PROMPTS[0], num_samples=2, max_tokens=10, temperature=1.0, seed=1, stop=[]),
        SampleRequest([*PROMPTS[2], poison], max_tokens=10, temperature=0.0),
        SampleRequest(PROMPTS[3], max_tokens=10, temperature=0.0, weights_id="lora-1"),
    ]
    expected = one_at_a_time(alone, [requests[0], requests[2]])
    monkeypatch.setattr(base.model, "forward", forward)
    futures = submit_together(batched, requests)
    with pytest.raises(ServerError, match="poisoned prompt"):
        futures[1].result(timeout=60)
    assert_same(futures[0].result(timeout=60), expected[0])
    assert_same(futures[2].result(timeout=60), expected[1])
    assert batched.running_sequences == 0 and batched.queue_depth == 0
