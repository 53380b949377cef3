"""Base model loading: alias map, default model, local directories, frozen eval-mode model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tether.engine.default_model import DEFAULT_MODEL_NAME
from tether.engine.lora import MultiLoraLinear, lora_layers
from tether.engine.model_loading import load_base_model, resolve_model_path
from tether.types.errors import ConfigurationError, NotFoundError, UserInputError


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        eos_token_id=[3, 4],
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_default_model_loads_frozen_in_eval_mode_with_lora_wrappers(default_model_dir):
    base = load_base_model(DEFAULT_MODEL_NAME)
    assert base.name == DEFAULT_MODEL_NAME
    assert base.path == default_model_dir
    assert base.tokenizer_path == default_model_dir
    assert base.vocab_size == 264
    assert base.max_context_length == 1024
    assert base.eos_token_ids == [256]
    assert not base.model.training
    assert all(not p.requires_grad for p in base.model.parameters())
    kinds = {layer.kind for _, layer in lora_layers(base.model)}
    assert kinds == {"attn", "mlp", "unembed"}


def test_alias_keeps_requested_name_and_loads_local_llama(tiny_llama_dir):
    base = load_base_model("Qwen/Qwen3-8B", aliases={"Qwen/Qwen3-8B": str(tiny_llama_dir)})
    assert base.name == "Qwen/Qwen3-8B"
    assert base.path == tiny_llama_dir
    assert type(base.model).__name__ == "LlamaForCausalLM"
    assert base.vocab_size == 40
    assert base.eos_token_ids == [3, 4]
    assert isinstance(base.model.model.layers[0].mlp.up_proj, MultiLoraLinear)
    reference = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokens = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(base.model(tokens).logits, reference(tokens).logits)


def test_local_directory_and_context_override(tiny_llama_dir):
    assert resolve_model_path(str(tiny_llama_dir), {}) == tiny_llama_dir
    base = load_base_model(str(tiny_llama_dir), max_context_length=16)
    assert base.max_context_length == 16
    assert load_base_model(str(tiny_llama_dir), max_context_length=4096).max_context_length == 64


def test_alias_to_default_model_name(default_model_dir):
    assert resolve_model_path("my-model", {"my-model": DEFAULT_MODEL_NAME}) == default_model_dir


def test_unknown_models_and_bad_settings_raise_typed_errors(tmp_path):
    with pytest.raises(NotFoundError):
        resolve_model_path("nobody/does-not-exist-xyz", {})
    with pytest.raises(NotFoundError):
        resolve_model_path(str(tmp_path), {})  # a directory without config.json
    with pytest.raises(NotFoundError):
        resolve_model_path("m", {"m": str(tmp_path / "missing")})
    with pytest.raises(ConfigurationError):
        load_base_model(DEFAULT_MODEL_NAME, dtype="float8")


def test_directory_that_is_not_a_loadable_causal_lm(tmp_path):
    from transformers import T5Config

    LlamaConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(
        tmp_path / "no-weights"
    )
    T5Config(vocab_size=8, d_model=8, num_layers=1, num_heads=1).save_pretrained(tmp_path / "t5")
    for directory in ("no-weights", "t5"):
        with pytest.raises(UserInputError) as error:
            load_base_model(str(tmp_path / directory))
        assert error.value.field == "base_model"


@pytest.mark.parametrize("name", ["default", "llama"])
def test_a_skeleton_has_meta_parameters_and_the_loaded_models_buffers_and_facts(
    name, default_model_dir, tiny_llama_dir
):
    """`weights=False` reads only the config: parameters on the meta device (no memory), the rotary
    buffers computed as from_pretrained has them, the same shapes, dtypes, vocabulary and eos ids."""
    source = DEFAULT_MODEL_NAME if name == "default" else str(tiny_llama_dir)
    full = load_base_model(source, dtype="bfloat16")
    skeleton = load_base_model(source, dtype="bfloat16", weights=False)
    assert all(p.is_meta for p in skeleton.model.parameters())
    assert {n: (p.shape, p.dtype) for n, p in skeleton.model.named_parameters()} == {
        n: (p.shape, p.dtype) for n, p in full.model.named_parameters()
    }
    buffers = dict(full.model.named_buffers())
    assert buffers and all(torch.equal(b, buffers[n]) for n, b in skeleton.model.named_buffers())
    assert len(lora_layers(skeleton.model)) == len(lora_layers(full.model))
    assert (skeleton.vocab_size, skeleton.max_context_length, skeleton.eos_token_ids) == (
        full.vocab_size,
        full.max_context_length,
        full.eos_token_ids,
    )
