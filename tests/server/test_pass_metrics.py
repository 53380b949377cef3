"""Prometheus /metrics shows whether LoRA tenants' forward_backwards were fused: per base model,
passes and the ops they carried, fused or not, and the most ops one pass carried."""

from __future__ import annotations

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tether.server.config import ServerConfig
from tether.server.main import ServerThread
from tether.types import ops
from tether.types.wire import LoraConfig

BASE = "tether/tiny-qwen3"
TENANTS = 3


def _fb(model_id: str) -> ops.ForwardBackward:
    tokens = np.arange(1, 9, dtype=np.int64)
    datum = ops.TrainingDatum(
        input_tokens=tokens[:-1],
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": np.ones(7, np.float32)},
    )
    return ops.ForwardBackward(model_id=model_id, data=[datum], loss_fn="cross_entropy")


def _scrape(base_url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{base_url}/metrics", headers={"Authorization": "Bearer tml-a"}, timeout=30).text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("base_model") == BASE:
                found[sample.name, sample.labels.get("fused", "")] = sample.value
    return found


def test_metrics_count_one_fused_pass_for_tenants_queued_together(tmp_path, default_model_dir):
    config = ServerConfig(port=0, data_dir=tmp_path, long_poll_s=5, torch_threads=1)
    server = ServerThread(config)
    with server as base_url:
        trainer = server.app.state.tether.trainers.get(BASE)  # in-process (the default)
        for t in range(TENANTS):
            trainer.submit(
                ops.CreateModel(model_id=f"t{t}", lora_config=LoraConfig(rank=2, seed=t)), stream=f"t{t}"
            ).result(60)
        trainer.submit(_fb("t0"), stream="t0", seq_id=1).result(60)  # alone: an unfused pass
        with trainer.executor.training._lock:  # the worker waits on the lock while the rest queue up
            trainer.submit(ops.DeleteModel(model_id="gate"), stream="gate")
            futures = [
                trainer.submit(_fb(f"t{t}"), stream=f"t{t}", seq_id=2 if t == 0 else 1)
                for t in range(TENANTS)
            ]
        for future in futures:
            future.result(60)
        found = _scrape(base_url)
    assert found[("tether_training_passes_total", "true")] == 1
    assert found[("tether_training_pass_ops_total", "true")] == TENANTS
    assert found[("tether_training_passes_total", "false")] == 1
    assert found[("tether_training_pass_ops_total", "false")] == 1
    assert found[("tether_training_max_ops_per_pass", "")] == TENANTS
