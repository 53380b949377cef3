#!/usr/bin/env bash
# One short GPU check of the engines on a machine with CUDA torch (installs nothing, downloads nothing):
#  1. MFU of one full fine-tuning step on a random-init ~1.1B Qwen3 in bf16 (bench/mfu.py; target >= 40%
#     of --peak-tflops, default the H200's dense bf16 989 TFLOP/s: set PEAK_TFLOPS for another GPU),
#     through the plain engine, then through the 1-rank FSDP2 engine (fp32 weights, bf16 compute);
#  2. the FSDP2 engine on every GPU (NCCL, sharded start-up) vs one process (bench/distributed_throughput.py);
#  3. tether's sampler weights (PEFT adapter, full snapshot) in vLLM vs tether's logprobs (bench/vllm_check.py;
#     skipped unless vllm imports: install it beforehand, see that script's docstring; VLLM_PYTHON=its python);
#  4. the CUDA-marked tests, training throughput vs a plain PyTorch loop, sampling throughput vs transformers
#     generate and the multi-tenant bench, on a randomly initialised 150M-parameter Qwen3.
# Every step runs under `timeout`; the whole check stops within GPU_CHECK_BUDGET_S (default 470 s, ~8 min):
# a step gets at most what is left. Each step prints its exit status and seconds.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
VLLM_PYTHON=${VLLM_PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
NGPU=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
START=$SECONDS
QUIET="Loading weights\|Writing model\|it/s\]"

step() {  # step NAME TIMEOUT_S COMMAND...: run under timeout, capped by what is left of the budget
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 15 ]; then echo "--- $name: skipped (budget of ${BUDGET}s spent)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (timeout ${limit}s)"
  local began=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v "$QUIET"
  local rc=${PIPESTATUS[0]}
  echo "--- $name: rc $rc$([ "$rc" = 124 ] && echo ' (timed out)'), $((SECONDS - began)) s"
}

step "build 150M Qwen3" 60 python3 - <<'PY'
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
torch.manual_seed(0)
cfg = Qwen3Config(vocab_size=32768, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
                  tie_word_embeddings=False)
with torch.device("cuda"):
    model = Qwen3ForCausalLM(cfg)
model.save_pretrained("/tmp/q150m")
PY
step "MFU, 1.1B Qwen3, plain engine, bf16" 120 python3 bench/mfu.py --preset 1b --model-dir /tmp/q1b \
  --engine plain --device cuda --dtype bfloat16 --batch 8 --seq-len 2048 --steps 5 --warmup 2 --peak-tflops "$PEAK_TFLOPS"
step "MFU, 1.1B Qwen3, 1-rank FSDP2, fp32 weights + bf16 compute" 90 python3 bench/mfu.py --preset 1b \
  --model-dir /tmp/q1b --engine fsdp --device cuda --dtype float32 --mixed-precision bfloat16 --batch 8 --seq-len 2048 \
  --steps 3 --warmup 1 --peak-tflops "$PEAK_TFLOPS"
step "FSDP2 on $NGPU GPU(s) vs one process, 150M full fine-tuning" 60 python3 bench/distributed_throughput.py \
  --model /tmp/q150m --nproc "$NGPU" --device cuda --dtype bfloat16 --batch 8 --seq-len 1024 --steps 5
step "vLLM loads tether's sampler weights" 150 python3 bench/vllm_check.py --device cuda --dtype bfloat16 \
  --out "$OUT/vllm" --vllm-python "$VLLM_PYTHON"
step "CUDA tests" 60 python3 -m pytest -q -p no:cacheprovider tests/engine/test_training_gpu.py
step "engine throughput" 60 python3 bench/engine_throughput.py --model /tmp/q150m --device cuda --dtype bfloat16 \
  --batch 8 --seq-len 1024 --steps 10
step "sampling throughput" 60 python3 bench/sampling_throughput.py --model /tmp/q150m --device cuda \
  --dtype bfloat16 --baseline both
step "multi-tenant" 60 python3 bench/multi_tenant.py --model /tmp/q150m --device cuda --dtype bfloat16 --rounds 3
echo "gpu_check done in $((SECONDS - START)) s"
