#!/usr/bin/env bash
# One short GPU check of the engines (run on a machine with CUDA torch; installs nothing):
# training throughput vs a plain PyTorch loop and sampling throughput vs transformers generate,
# on a randomly initialised 150M-parameter Qwen3 (no download), plus the CUDA-marked tests.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
python3 - <<'PY'
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
torch.manual_seed(0)
cfg = Qwen3Config(vocab_size=32768, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
                  tie_word_embeddings=False)
Qwen3ForCausalLM(cfg).save_pretrained("/tmp/q150m")
PY
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/engine/test_training_gpu.py 2>&1 | tail -3
timeout 120 python3 bench/engine_throughput.py --model /tmp/q150m --device cuda --dtype bfloat16 --batch 8 --seq-len 1024 --steps 10 2>&1 | grep -v "Loading weights\|Writing model"
timeout 120 python3 bench/sampling_throughput.py --model /tmp/q150m --device cuda --dtype bfloat16 --baseline both 2>&1 | grep -v "Loading weights\|Writing model"
timeout 150 python3 bench/multi_tenant.py --model /tmp/q150m --device cuda --dtype bfloat16 --rounds 3 2>&1 | grep -v "Loading weights\|Writing model"
