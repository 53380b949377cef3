"""A small Qwen3 on disk, and `tether serve` (the control plane, in a thread of this process) on it."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, default_model_dir):
    """A 2-layer Qwen3 (the default vocabulary, tied embeddings) with the default model's tokenizer files."""
    import shutil

    config = Qwen3Config.from_pretrained(default_model_dir)
    config.update(
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 128,
            "tie_word_embeddings": True,
            "layer_types": ["full_attention"] * 2,
        }
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("deploy-qwen3")
    Qwen3ForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        source = default_model_dir / name
        if source.is_file():
            shutil.copyfile(source, path / name)
    return path


@pytest.fixture(scope="module")
def thread(model_dir, tmp_path_factory):
    """`tether serve` on `model_dir` in a thread, one per test module; stopped after the module."""
    from tether.server.config import ServerConfig
    from tether.server.main import ServerThread

    config = ServerConfig(
        port=0, models=[str(model_dir)], data_dir=tmp_path_factory.mktemp("serve"), torch_threads=1
    )
    server = ServerThread(config)
    server.start()
    yield server
    server.stop()
