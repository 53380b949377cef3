"""The engine drives other Hugging Face causal LM families too: greedy output equals `generate`."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tether.engine.model_loading import load_base_model
from tether.engine.sampling import SampleRequest, SamplingEngine

ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            initializer_range=0.3,
            eos_token_id=3,
        )
    ),
    "gpt2": lambda: GPT2LMHeadModel(  # learned absolute positions, fused qkv, its own cache calls
        GPT2Config(
            vocab_size=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            initializer_range=0.3,
            eos_token_id=3,
            bos_token_id=3,
        )
    ),
    "qwen3-sliding": lambda: Qwen3ForCausalLM(  # every other layer sees only the last 4 tokens
        Qwen3Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=128,
            initializer_range=0.3,
            eos_token_id=3,
            use_sliding_window=True,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        )
    ),
}


@pytest.mark.parametrize(
    "architecture, attention",
    [
        ("llama", "sdpa"),
        ("llama", "eager"),
        ("gpt2", "sdpa"),
        ("qwen3-sliding", "sdpa"),
        ("qwen3-sliding", "eager"),
    ],
    ids=str,
)
def test_greedy_equals_generate(architecture, attention, tmp_path):
    torch.manual_seed(0)
    ARCHITECTURES[architecture]().save_pretrained(tmp_path)
    base = load_base_model(str(tmp_path))
    base.model.set_attn_implementation(attention)  # eager attention adds the mask to its scores
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40]]
    engine = SamplingEngine(base, prefill_forward_cost_tokens=float("inf"))  # mixed lengths in one prefill
    try:
        with engine._cond:  # white-box: queue all before the loop admits any, so they prefill in one batch
            futures = [
                engine.submit(SampleRequest(p, max_tokens=15, temperature=0.0, stop=[])) for p in prompts
            ]
        results = [f.result(timeout=60).sequences[0].tokens for f in futures]
    finally:
        engine.close()
    for prompt, tokens in zip(prompts, results, strict=True):
        with torch.no_grad():
            expected = base.model.generate(
                torch.tensor([prompt]), max_new_tokens=15, min_new_tokens=15, do_sample=False, pad_token_id=0
            )
        assert tokens == expected[0, len(prompt) :].tolist()
