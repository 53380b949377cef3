import torch

from tether.engine.model_loading import load_base_model, resolve_device_and_dtype
from tether.server.config import ServerConfig


def test_auto_picks_cuda_and_bfloat16_only_when_a_gpu_exists(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device_and_dtype("auto", "auto") == ("cpu", "float32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device_and_dtype("auto", "auto") == ("cuda", "bfloat16")
    assert resolve_device_and_dtype("cpu", "auto") == ("cpu", "float32")
    assert resolve_device_and_dtype("cuda:1", "float32") == ("cuda:1", "float32")


def test_server_defaults_load_the_default_model_on_this_machine(default_model_dir):
    config = ServerConfig()
    base = load_base_model(config.models[0], device=config.device, dtype=config.dtype)
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(base.model.parameters()).device.type == expected_device
