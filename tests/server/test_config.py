"""ServerConfig: defaults, environment, and settings refused with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tether.server.config import ServerConfig


def test_defaults_serve_the_embedded_model_on_localhost(monkeypatch):
    monkeypatch.delenv("TETHER_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    config = ServerConfig()
    assert (config.host, config.port, config.models) == ("127.0.0.1", 8000, ["tether/tiny-qwen3"])
    assert config.data_dir == Path.home() / ".local" / "share" / "tether"
    assert all(field.description for field in ServerConfig.model_fields.values())


def test_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TETHER_DATA_DIR", str(tmp_path))
    assert ServerConfig().data_dir == tmp_path


@pytest.mark.parametrize(
    "bad", [{"api_keys": ["secret"]}, {"models": []}, {"port": 70000}, {"long_poll_s": 60}]
)
def test_invalid_settings_name_the_field(bad):
    with pytest.raises(ValidationError) as info:
        ServerConfig(**bad)
    assert next(iter(bad)) in str(info.value)


def test_server_modules_import_without_torch():
    """`tether serve --help` and server start-up must not pay for torch; engines load it on first use."""
    import subprocess
    import sys

    code = "import sys, tether.server.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_torch_threads_apply_when_the_base_model_loads(tmp_path, default_model_dir):
    import torch

    from tether.trainer.executor import OpExecutor

    before = torch.get_num_threads()
    try:
        config = ServerConfig(data_dir=tmp_path, torch_threads=1, device="cpu")
        executor = OpExecutor("tether/tiny-qwen3", config.engine_settings())
        assert executor.base.vocab_size == 264
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
