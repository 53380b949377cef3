"""Training tokens/s of the FSDP2 engine on N ranks vs the single-process engine, same model and global batch.

Each configuration runs in its own torchrun job (the baseline, `TrainingEngine`, in a 1-rank job
for the same launch path): a warm-up step, then `--steps` steps of `forward_backward` (cross
entropy over the whole global batch) + `optim_step`, timed on rank 0 after a barrier. Printed side
by side with the ratio (N ranks / 1). On CPU the ranks share the machine's cores, so the ratio
says what the collectives cost more than what a second device would give; on GPUs use one rank
per GPU (`--device cuda`, NCCL; `--nproc 1` on a single GPU measures FSDP2's own overhead).

    PYTHONPATH=. python bench/distributed_throughput.py [--model tether/tiny-qwen3] [--nproc 2]
        [--batch 8] [--seq-len 128] [--steps 5] [--lora-rank 0] [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tether/tiny-qwen3")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="datums in the global batch")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--mixed-precision", default="none", choices=["none", "bfloat16"])
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="CPU threads in all (default: the cores this process may use), split evenly over the ranks",
    )
    parser.add_argument("--engine", choices=["single", "fsdp"], help=argparse.SUPPRESS)  # worker mode
    return parser.parse_args()


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from tether.engine.fsdp_collectives import exit_process, leave_process_group
    from tether.engine.lora import LoraSpec
    from tether.engine.model_loading import load_base_model
    from tether.engine.training_types import AdamWParams, EngineDatum

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    torch.set_num_threads(max(1, args.threads // dist.get_world_size()))  # the same cores for 1 and N ranks
    if args.engine == "fsdp":  # as the trainer starts: a skeleton, each rank reading its shards
        from tether.engine.fsdp import DistributedTrainingEngine

        base = load_base_model(args.model, device=device, dtype=args.dtype, weights=False)
        engine = DistributedTrainingEngine(base, mixed_precision=args.mixed_precision)
    else:
        from tether.engine.training_engine import TrainingEngine

        base = load_base_model(args.model, device=device, dtype=args.dtype)
        engine = TrainingEngine(base)
    engine.create_model("bench", lora=LoraSpec(rank=args.lora_rank) if args.lora_rank else None)
    generator = torch.Generator().manual_seed(0)
    vocab = min(base.vocab_size, 256)
    data = []
    for _ in range(args.batch):
        tokens = torch.randint(0, vocab, (args.seq_len + 1,), generator=generator)
        data.append(
            EngineDatum(
                tokens[:-1].clone(),
                {"target_tokens": tokens[1:].clone(), "weights": torch.ones(args.seq_len)},
            )
        )
    adam = AdamWParams(learning_rate=1e-5)

    def step() -> None:
        engine.forward_backward("bench", data, "cross_entropy")
        engine.optim_step("bench", adam)

    step()  # warm-up
    dist.barrier()
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    elapsed = time.perf_counter() - start
    if dist.get_rank() == 0:
        tokens = args.batch * args.seq_len * args.steps
        print(
            "RESULT " + json.dumps({"tokens_per_s": tokens / elapsed, "s_per_step": elapsed / args.steps}),
            flush=True,
        )
    leave_process_group(together=True)
    exit_process(0)  # not through the interpreter's shutdown: see exit_process


def launch(args: argparse.Namespace, engine: str, nproc: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        __file__,
        "--engine",
        engine,
    ]
    for name in (
        "model",
        "batch",
        "seq_len",
        "steps",
        "lora_rank",
        "device",
        "dtype",
        "mixed_precision",
        "threads",
    ):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{engine} on {nproc} rank(s) failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    args = parse()
    if args.engine is not None:
        worker(args)
        return
    if args.model == "tether/tiny-qwen3":
        from tether.engine.default_model import ensure_default_model

        ensure_default_model()
    one = launch(args, "single", 1)
    many = launch(args, "fsdp", args.nproc)
    mode = f"LoRA r{args.lora_rank}" if args.lora_rank else "full fine-tuning"
    print(
        f"model {args.model}, {mode}, global batch {args.batch} x {args.seq_len} tokens, {args.steps} steps, "
        f"{args.device} {args.dtype}, {args.threads} CPU threads in all"
    )
    print(f"{'':28}{'tokens/s':>12}{'s/step':>10}")
    print(f"{'1 process (TrainingEngine)':28}{one['tokens_per_s']:>12.1f}{one['s_per_step']:>10.3f}")
    print(f"{f'{args.nproc} ranks (FSDP2)':28}{many['tokens_per_s']:>12.1f}{many['s_per_step']:>10.3f}")
    print(f"ratio {args.nproc} ranks / 1: {many['tokens_per_s'] / one['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
