"""Fixtures for the sampling engine tests: a tiny model whose next-token distributions are peaked.

The embedded default model is initialised so gently that every distribution is nearly uniform, which
makes greedy ties and stop tests meaningless; this one has larger weights and the same byte-level
tokenizer, so text stops and greedy decoding exercise real choices.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from tether.engine.default_model import build_tokenizer
from tether.engine.model_loading import LoadedBaseModel, load_base_model
from tether.engine.sampling import SamplingEngine
from tether.engine.sampling import engine as engine_module

EOS = 256


@pytest.fixture(scope="session")
def peaked_model_dir(tmp_path_factory):
    tokenizer = build_tokenizer()
    config = Qwen3Config(
        vocab_size=264,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.3,
        eos_token_id=EOS,
        pad_token_id=257,
        bos_token_id=None,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(7)
    model = Qwen3ForCausalLM(config)
    torch.random.set_rng_state(state)
    path = tmp_path_factory.mktemp("peaked-qwen3")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(peaked_model_dir) -> LoadedBaseModel:
    return load_base_model(str(peaked_model_dir))


@pytest.fixture()
def engine(base):
    engine = SamplingEngine(base, kv_cache_budget_tokens=8192, max_batch_size=32)
    yield engine
    engine.close()


class PrefillCalls(list):
    """Prompts the engine prefilled (token tuples), and the size of each batched forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_sizes: list[int] = []


@pytest.fixture()
def prefill_calls(monkeypatch) -> PrefillCalls:
    calls = PrefillCalls()
    real = engine_module.prefill_batch

    def counting(model, prompts):
        calls.extend(tuple(p.tokens) for p in prompts)
        calls.batch_sizes.append(len(prompts))
        return real(model, prompts)

    monkeypatch.setattr(engine_module, "prefill_batch", counting)
    return calls
