"""RL steps per minute: asynchronous (`max_steps_off_policy=2`) vs synchronous, side by side.

Both runs are `tether.recipes.rl.train_rl` on the same server, model, environment, batch and
sampling settings; only `max_steps_off_policy` differs (0 = synchronous on-policy: every step
samples its groups on the newest weights, then trains; 2 = sampling for the next steps overlaps
training). Each measured run starts from a fresh model with the same seed. The runs alternate
(sync, async, sync, async, ...) so drift in machine load hits both alike; median and best
steps/min are reported, and their async / sync ratio. Each run's first step (server warm-up,
first sampler snapshot) is excluded by timing steps 1..N through `on_step_end`.

    PYTHONPATH=. python bench/async_rl.py [--steps 8] [--reps 2] [--batch-size 8] [--group-size 8]
        [--max-tokens 24] [--lora-rank 8] [--model tether/tiny-qwen3] [--device cpu] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from tether.client import ServiceClient
from tether.recipes import grpo, rl
from tether.server.config import ServerConfig
from tether.server.main import ServerThread


def one_run(
    service: ServiceClient, args: argparse.Namespace, off_policy: int, log_dir: Path
) -> tuple[float, dict]:
    """Steps per minute over steps 1..N of one run, and its last metrics row."""
    config = rl.Config(
        log_dir=log_dir,
        model_name=args.model,
        lora_rank=args.lora_rank,
        learning_rate=1e-4,
        batch_size=args.batch_size,
        group_size=args.group_size,
        num_steps=args.steps + 1,
        max_tokens=args.max_tokens,
        num_operands=4,
        test_size=10,
        eval_every=None,
        save_every=None,
        resume=False,
        progress=False,
        max_steps_off_policy=off_policy,
        seed=0,
    )
    marks: list[float] = []
    result = rl.train_rl(
        config,
        service,
        grpo.problem_source(config),
        on_step_end=lambda step, m: marks.append(time.perf_counter()),
    )
    return args.steps / (marks[-1] - marks[0]) * 60.0, result.metrics[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tether/tiny-qwen3")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--reps", type=int, default=2, help="runs of each mode")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts (groups) per step")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--torch-threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    root = Path(tempfile.mkdtemp(prefix="bench-async-rl-"))
    config = ServerConfig(
        port=0, models=[args.model], data_dir=root / "server", device=args.device, torch_threads=args.torch_threads,
        log_level="warning",
    )  # fmt: skip
    rates: dict[int, list[float]] = {0: [], 2: []}
    lag: dict[int, float] = {}
    with ServerThread(config) as url:
        service = ServiceClient(base_url=url, api_key="tml-bench")
        one_run(service, args, 2, root / "warmup")  # compile/allocate once before timing anything
        for rep in range(args.reps):
            for off_policy in (0, 2) if rep % 2 == 0 else (2, 0):
                rate, last = one_run(service, args, off_policy, root / f"run-{off_policy}-{rep}")
                rates[off_policy].append(rate)
                lag[off_policy] = last["async/staleness_mean"]
        service.close()

    print(
        f"model {args.model} on {args.device}, {args.batch_size} groups x {args.group_size} samples x"
        f" <= {args.max_tokens} tokens per step, LoRA rank {args.lora_rank}, {args.steps} timed steps, {args.reps} runs each"
    )
    for off_policy, name in ((0, "synchronous"), (2, "max_steps_off_policy=2")):
        values = rates[off_policy]
        print(
            f"  {name:<24} median {statistics.median(values):7.1f} steps/min, best {max(values):7.1f}"
            f"  (staleness at the end: {lag[off_policy]:.1f})"
        )
    for stat_name, stat in (("median", statistics.median), ("best", max)):
        print(f"{stat_name:>6}: async / sync = {stat(rates[2]) / stat(rates[0]):.2f}x steps per minute")


if __name__ == "__main__":
    main()
