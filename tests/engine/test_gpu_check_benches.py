"""The Python steps of bench/gpu_check.sh run on CPU with tiny models: the MFU bench prints a utilisation
ratio (no timing asserted); the vLLM check writes tether's sampler weights and logprobs, and skips vLLM
when it is not installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("engine", ["plain", "fsdp"])
def test_mfu_bench_prints_a_ratio_for_one_step(tmp_path, engine):
    command = [sys.executable, str(ROOT / "bench" / "mfu.py"), "--preset", "tiny", "--engine", engine]
    command += ["--device", "cpu", "--dtype", "float32", "--batch", "2", "--seq-len", "16"]
    command += ["--steps", "1", "--warmup", "0", "--peak-tflops", "1", "--model-dir", str(tmp_path / "m")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # the FLOPs count follows PaLM's formula for this model: 2 datums x 16 tokens
    params = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 256 * 64  # 2 layers (q,o k,v mlp) + tied head
    flops = 2 * 16 * (6 * params + 12 * 2 * 4 * 16 * 16)
    assert f"model FLOPs per step {flops / 1e12:.4g} TFLOP" in done.stdout
    ratio = re.search(r"^MFU (\S+) \(.*target >= 0\.40", done.stdout, re.M)
    assert ratio and 0 < float(ratio.group(1)) < 1, done.stdout


def test_vllm_check_prepares_tethers_weights_and_skips_without_vllm(tmp_path):
    import importlib.util
    import json

    command = [sys.executable, str(ROOT / "bench" / "vllm_check.py"), "--device", "cpu", "--dtype", "float32"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    if importlib.util.find_spec("vllm") is None:
        assert "vllm not installed: step skipped" in done.stdout
    expected = json.loads((tmp_path / "expected.json").read_text())
    n = len(expected["sequence"]) - 1
    assert all(len(expected[f"{k}_logprobs"]) == n for k in ("base", "lora", "full"))
    adapter = json.loads((Path(expected["lora_dir"]) / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and "lm_head" not in adapter["target_modules"]  # vLLM serves no LM-head LoRA
    assert (Path(expected["full_dir"]) / "config.json").exists()
    assert (Path(expected["full_dir"]) / "model.safetensors").exists()
    # the trained weights move the checked logprobs, so matching them in vLLM is not vacuous
    assert (
        max(abs(a - b) for a, b in zip(expected["lora_logprobs"], expected["base_logprobs"], strict=True))
        > 0.05
    )
