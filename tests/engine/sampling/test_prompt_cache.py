"""Reuse of recent prefills for identical prompts: the LRU itself, and the engine using it."""

from __future__ import annotations

import pytest
import torch

from tether.engine.lora import LoraSpec, lora_layers
from tether.engine.sampling import SampleRequest, SamplingEngine
from tether.engine.sampling.prompt_cache import PromptCache

PROMPT = list(b"An RL group shares this prompt")


def test_lru_is_bounded_by_tokens_and_evicts_least_recently_used():
    cache: PromptCache[str] = PromptCache(max_tokens=10)
    cache.put("a", "A", 4)
    cache.put("b", "B", 4)
    assert cache.get("a") == "A"  # a is now the most recent
    cache.put("c", "C", 4)  # 12 > 10: b goes
    assert cache.get("b") is None and cache.get("a") == "A" and cache.get("c") == "C"
    assert cache.num_tokens == 8
    cache.put("huge", "H", 11)
    assert cache.get("huge") is None and len(cache) == 2
    cache.evict_where(lambda key: key == "a")
    assert cache.get("a") is None and cache.num_tokens == 4
    cache.clear()
    assert len(cache) == 0 and cache.num_tokens == 0


def lora(base, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        f"{name}.{kind}": torch.randn(shape, generator=generator) * 0.3
        for name, layer in lora_layers(base.model)
        for kind, shape in (("lora_A", (2, layer.in_features)), ("lora_B", (layer.out_features, 2)))
    }


def test_identical_prompts_are_prefilled_once_and_sample_the_same_as_without_reuse(base, prefill_calls):
    requests = [SampleRequest(PROMPT, max_tokens=12, temperature=1.0, seed=s, stop=[]) for s in range(6)]
    reusing = SamplingEngine(base)
    plain = SamplingEngine(base, prompt_cache_tokens=None)
    try:
        shared = [f.result(timeout=60) for f in [reusing.submit(r) for r in requests]]
        assert len(prefill_calls) == 1
        assert sorted(r.prompt_cache_hit_tokens for r in shared) == [0] + [len(PROMPT)] * 5
        alone = [f.result(timeout=60) for f in [plain.submit(r) for r in requests]]
        assert len(prefill_calls) == 1 + len(requests)
    finally:
        reusing.close()
        plain.close()
    for a, b in zip(shared, alone, strict=True):
        assert a.sequences[0].tokens == b.sequences[0].tokens
        assert a.sequences[0].logprobs == pytest.approx(b.sequences[0].logprobs, abs=1e-5)


def test_reuse_is_per_weights_and_per_prompt_logprob_options(engine, base, prefill_calls):
    engine.register_lora("v1", LoraSpec(rank=2), lora(base, 1))
    first = engine.submit(SampleRequest(PROMPT, max_tokens=4, temperature=0.0, weights_id="v1")).result(
        timeout=60
    )
    engine.unregister("v1")
    engine.register_lora("v1", LoraSpec(rank=2), lora(base, 2))  # a new snapshot under the same name
    second = engine.submit(SampleRequest(PROMPT, max_tokens=4, temperature=0.0, weights_id="v1")).result(
        timeout=60
    )
    assert len(prefill_calls) == 2 and second.prompt_cache_hit_tokens == 0
    assert first.sequences[0].logprobs != second.sequences[0].logprobs
    with_logprobs = engine.submit(
        SampleRequest(PROMPT, max_tokens=1, weights_id="v1", include_prompt_logprobs=True)
    ).result(timeout=60)
    assert len(prefill_calls) == 3 and with_logprobs.prompt_logprobs is not None
    again = engine.submit(
        SampleRequest(PROMPT, max_tokens=1, weights_id="v1", include_prompt_logprobs=True)
    ).result(timeout=60)
    assert len(prefill_calls) == 3 and again.prompt_logprobs == with_logprobs.prompt_logprobs
    assert again.prompt_logprobs is not with_logprobs.prompt_logprobs


def test_prefills_of_unregistered_weights_are_forgotten(engine, base):
    engine.register_lora("gone", LoraSpec(rank=2), lora(base, 3))
    engine.submit(SampleRequest(PROMPT, max_tokens=2, weights_id="gone")).result(timeout=60)
    assert any(key[0].weights_id == "gone" for key in engine._prompt_cache._entries)  # white-box
    engine.unregister("gone")
    engine.submit(SampleRequest(PROMPT, max_tokens=2)).result(timeout=60)  # the next step cleans up
    assert not any(key[0].weights_id == "gone" for key in engine._prompt_cache._entries)
