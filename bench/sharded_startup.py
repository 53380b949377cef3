"""Peak host memory of each rank starting a multi-rank trainer's engine and creating a full fine-tuning copy.

Two torchrun jobs of `--nproc` ranks on the same model (CPU, gloo), printed side by side with the ratio:

- sharded: the base model is a meta-device skeleton; each rank allocates and reads only its shards
  (what `tether.trainer.distributed` does);
- whole: every rank loads the whole base model, copies it and shards the copy (the former start-up).

Each rank reports its peak resident set size (`ru_maxrss`) after `create_model`. With N ranks the
sharded start-up should hold about 1/N of the model's weights per rank, plus the interpreter.

    PYTHONPATH=. python bench/sharded_startup.py [--preset 150m] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="150m", help="a bench/mfu.py preset")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--mode", choices=["sharded", "whole"], help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from tether.engine.fsdp import DistributedTrainingEngine
    from tether.engine.fsdp_collectives import exit_process, leave_process_group
    from tether.engine.model_loading import load_base_model

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    base = load_base_model(str(args.model_dir), device="cpu", dtype="float32", weights=args.mode == "whole")
    engine = DistributedTrainingEngine(base)
    engine.create_model("bench", lora=None)
    dist.barrier()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print("RESULT " + json.dumps({"rank": dist.get_rank(), "peak_mib": peak_mib}), flush=True)
    leave_process_group(together=True)
    exit_process(0)  # not through the interpreter's shutdown: see exit_process


def launch(args: argparse.Namespace, mode: str, model_dir: Path) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc)]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(port), __file__]
    command += ["--mode", mode, "--model-dir", str(model_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    results = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or len(results) != args.nproc:
        raise SystemExit(f"{mode} start-up failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return [r["peak_mib"] for r in sorted(results, key=lambda r: r["rank"])]


def main() -> None:
    args = parse()
    if args.mode is not None:
        worker(args)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from mfu import build_model  # the same random-init presets

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / args.preset
        build_model(args.preset, model_dir, 64)
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        weights_mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20
        sharded = launch(args, "sharded", model_dir)
        whole = launch(args, "whole", model_dir)
    print(
        f"Qwen3 {args.preset}: {weights_mib:.0f} MiB of fp32 weights, {args.nproc} ranks (gloo, CPU), "
        "full fine-tuning copy created"
    )
    print(f"{'rank':>6}{'sharded peak MiB':>18}{'whole peak MiB':>16}{'ratio':>8}")
    for rank, (a, b) in enumerate(zip(sharded, whole, strict=True)):
        print(f"{rank:>6}{a:>18.0f}{b:>16.0f}{a / b:>8.2f}")


if __name__ == "__main__":
    main()
