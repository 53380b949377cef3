"""Fixtures for the engine tests: loaded base models shared per session, a fresh engine per test.

`small_base` is a Qwen3 far smaller than the default model so full fine-tuning tests stay fast on a
shared CPU; `default_base` is the embedded default model, loaded through the same code path.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from tether.engine.default_model import DEFAULT_MODEL_NAME
from tether.engine.model_loading import load_base_model


@pytest.fixture(scope="session")
def default_base(default_model_dir):
    """The default model loaded once; engines built on it remove their adapters when done."""
    return load_base_model(DEFAULT_MODEL_NAME)


@pytest.fixture(scope="session")
def small_base(tmp_path_factory):
    """A 2-layer Qwen3 with 48 tokens and hidden size 32, saved with save_pretrained and loaded back."""
    config = Qwen3Config(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("small-qwen3")
    Qwen3ForCausalLM(config).save_pretrained(path)
    return load_base_model(str(path))


@pytest.fixture
def training_engine(small_base):
    from tether.engine.training_engine import TrainingEngine

    engine = TrainingEngine(small_base)
    yield engine
    for model_id in engine.list_models():
        engine.delete_model(model_id)


@pytest.fixture(scope="session")
def small_llama_base(tmp_path_factory):
    """A second architecture: Llama with untied embeddings and attention biases."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_bias=True,
    )
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("small-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return load_base_model(str(path))
