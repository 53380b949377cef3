"""The engine on a CUDA device gives the CPU engine's results (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from engine_reference import make_data

from tether.engine.default_model import DEFAULT_MODEL_NAME
from tether.engine.lora import LoraSpec
from tether.engine.model_loading import load_base_model
from tether.engine.training_engine import AdamWParams, TrainingEngine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("lora", [LoraSpec(rank=4, seed=1), None], ids=["lora", "full"])
def test_cuda_engine_matches_cpu_engine(default_model_dir, lora):
    results = {}
    for device in ("cpu", "cuda"):
        engine = TrainingEngine(
            load_base_model(DEFAULT_MODEL_NAME, device=device), max_tokens_per_micro_batch=16
        )
        engine.create_model("m", lora=lora)
        data = make_data([7, 3, 5], vocab=engine.base.vocab_size)
        engine.forward_backward("m", data, "ppo")
        grads = engine.accumulated_gradients("m")
        metrics = engine.optim_step("m", AdamWParams(learning_rate=1e-3, eps=1e-3))
        handle, kept = engine.forward_keep_graph("m", data)
        engine.backward_from_logprob_grads(handle, [torch.ones_like(o["logprobs"]) for o in kept.outputs])
        state = engine.export_state("m", include_optimizer=True)
        results[device] = (kept.outputs, grads, metrics, state)
    cpu, cuda = results["cpu"], results["cuda"]
    tol = {"atol": 1e-4, "rtol": 1e-4}
    for a, b in zip(cpu[0], cuda[0], strict=True):
        assert b["logprobs"].device.type == "cuda"
        torch.testing.assert_close(a["logprobs"], b["logprobs"].cpu(), **tol)
    for name in cpu[1]:
        torch.testing.assert_close(cpu[1][name], cuda[1][name].cpu(), **tol)
    assert cpu[2]["grad_norm:mean"] == pytest.approx(cuda[2]["grad_norm:mean"], rel=1e-4)
    for name in cpu[3].weights:
        torch.testing.assert_close(cpu[3].weights[name], cuda[3].weights[name].cpu(), **tol)
