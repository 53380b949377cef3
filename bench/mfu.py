"""Model FLOPs utilisation (MFU) of one training step through tether's engine, on a random-init Qwen3.

Builds a Qwen3 from a preset config with random weights (no download) into `--model-dir`, loads it
with `load_base_model` and runs `forward_backward` (cross entropy) + `optim_step` of full
fine-tuning through the plain `TrainingEngine` or the FSDP2 `DistributedTrainingEngine` on one
rank (`--engine fsdp`, fp32 weights with bf16 compute when `--mixed-precision bfloat16`). After
`--warmup` untimed steps, the median of `--steps` timed steps gives the achieved FLOP/s:

    model FLOPs per step = sum over datums of  tokens * (6 * N + 12 * L * H * Q * T)

the formula of PaLM (Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways",
Appendix B "Compute usage and model FLOPs utilization"): 6N per token for the forward and backward
matmuls of N parameters, plus 12*L*H*Q*T per token for the attention score and value matmuls
(L layers, H query heads, Q head dimension, T the sequence length), no recomputation counted. N is
the number of weights in the model's linear layers (the LM head included, the input embedding
lookup excluded: it does no matmul), the same count Megatron-LM's formula (Narayanan et al.
2021, "Efficient Large-Scale Language Model Training on GPU Clusters", section 5.1) uses.
MFU = achieved FLOP/s / `--peak-tflops` (default 989: an H200's dense bf16 tensor-core peak).

    PYTHONPATH=. python bench/mfu.py --preset 1b --device cuda --dtype bfloat16       # GPU check
    PYTHONPATH=. python bench/mfu.py --preset tiny --device cpu --dtype float32 --steps 1 --warmup 0
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

PRESETS = {
    # ~1.1B parameters: Qwen3-1.7B's widths at 16 layers (tied embeddings, 151936-token vocabulary)
    "1b": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "150m": dict(
        vocab_size=32768,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    ),
}
H200_DENSE_BF16_TFLOPS = 989.0
TARGET_MFU = 0.40


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument(
        "--model-dir", type=Path, help="where the random model is written (default: a temp dir)"
    )
    parser.add_argument("--engine", choices=["plain", "fsdp"], default="plain")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", help="weight dtype (bfloat16: params and compute)")
    parser.add_argument("--mixed-precision", choices=["none", "bfloat16"], default="none", help="fsdp only")
    parser.add_argument("--batch", type=int, default=8, help="datums per step")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=H200_DENSE_BF16_TFLOPS)
    return parser.parse_args()


def build_model(preset: str, directory: Path, seq_len: int) -> None:
    """A random-init Qwen3 of `preset`, saved in bf16 to `directory` (built on the GPU when there is one)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**PRESETS[preset], max_position_embeddings=max(seq_len, 64), eos_token_id=1)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)


def matmul_params(model: torch.nn.Module) -> int:
    """Weights of every linear layer (the LM head included; embeddings looked up, not multiplied, excluded)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def step_flops(config, n_params: int, lengths: list[int]) -> float:
    """PaLM's model FLOPs of one training step over datums of `lengths` tokens (see the module docstring)."""
    layers, heads, head_dim = config.num_hidden_layers, config.num_attention_heads, config.head_dim
    return float(sum(t * (6 * n_params + 12 * layers * heads * head_dim * t) for t in lengths))


def make_engine(args: argparse.Namespace, model_dir: Path):
    from tether.engine.model_loading import load_base_model

    if args.engine == "plain":
        from tether.engine.training_engine import TrainingEngine

        base = load_base_model(str(model_dir), device=args.device, dtype=args.dtype)
        return TrainingEngine(base, max_tokens_per_micro_batch=args.micro_batch_tokens), base
    import torch.distributed as dist

    from tether.engine.fsdp import DistributedTrainingEngine

    if not dist.is_initialized():  # one rank, no torchrun needed
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cuda = args.device.startswith("cuda")
        dist.init_process_group(
            "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
        )
    base = load_base_model(str(model_dir), device=args.device, dtype=args.dtype, weights=False)
    engine = DistributedTrainingEngine(
        base, max_tokens_per_micro_batch=args.micro_batch_tokens, mixed_precision=args.mixed_precision
    )
    return engine, base


def main() -> None:
    args = parse()
    from tether.engine.training_types import AdamWParams, EngineDatum

    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device).index or 0)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir or Path(scratch) / f"qwen3-{args.preset}"
        if not (model_dir / "config.json").exists():
            build_model(args.preset, model_dir, args.seq_len)
        engine, base = make_engine(args, model_dir)
        engine.create_model("mfu", lora=None)
        n_params = matmul_params(base.model)
        generator = torch.Generator().manual_seed(0)
        data = []
        for _ in range(args.batch):
            tokens = torch.randint(0, base.vocab_size, (args.seq_len + 1,), generator=generator)
            inputs = {"target_tokens": tokens[1:].clone(), "weights": torch.ones(args.seq_len)}
            data.append(EngineDatum(tokens[:-1].clone(), inputs))
        adam = AdamWParams(learning_rate=1e-5)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        times = []
        for index in range(args.warmup + args.steps):
            sync()
            start = time.perf_counter()
            engine.forward_backward("mfu", data, "cross_entropy")
            engine.optim_step("mfu", adam)
            sync()
            if index >= args.warmup:
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        flops = step_flops(base.model.config, n_params, [args.seq_len] * args.batch)
        achieved = flops / seconds / 1e12
        mfu = achieved / args.peak_tflops
        memory = (
            f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            if args.device.startswith("cuda")
            else ""
        )
        print(
            f"Qwen3 {args.preset} ({n_params / 1e6:.4g}M matmul params), {args.engine} engine, full fine-tuning, "
            f"{args.device} {args.dtype} (mixed precision {args.mixed_precision}), "
            f"batch {args.batch} x {args.seq_len} tokens, median of {args.steps} steps{memory}"
        )
        print(f"step time {seconds:.3f} s, model FLOPs per step {flops / 1e12:.4g} TFLOP")
        print(f"achieved {achieved:.4g} TFLOP/s; peak {args.peak_tflops:g} TFLOP/s")
        print(
            f"MFU {mfu:.4g} ({100 * mfu:.3g}%), target >= {TARGET_MFU:.2f}: "
            f"{'met' if mfu >= TARGET_MFU else 'not met'}"
        )
        if args.engine == "fsdp":
            from tether.engine.fsdp_collectives import exit_process, leave_process_group

            leave_process_group(together=True)
            exit_process(0)  # not through the interpreter's shutdown: see exit_process


if __name__ == "__main__":
    main()
