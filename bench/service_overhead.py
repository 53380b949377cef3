"""What the service costs: one SFT step through the official tinker SDK + `tether serve` versus the same
step on the training engine alone, with the server's trainer in-process and in a `tether trainer`
process (`--trainer-process`: ops cross a local socket).

The layout is the one users have: each `tether serve` is its own process (started as `python -m tether
serve`), the SDK runs in this (the bench's) process, and the engine baseline runs in a process of its
own, so the SDK's CPU, the server's event loop and torch do not share one interpreter lock.
`--same-process` runs the old layout instead (servers as `ServerThread`s and the engine in this
process: everything under one GIL), which shows what the GIL costs.

All three train the same LoRA on the same base model and batch with the same torch thread count
(printed); steps alternate (engine, in-process service, trainer-process service, ...) so machine
noise hits all alike. Prints each one's step time (median, quartiles, min, max), the ratios of the
medians, and the median of the per-round ratios (each service step over the engine step next to it),
which drifting load disturbs less. Targets: service / engine <= 1.10; trainer-process / in-process <= 1.10.

On a CPU shared with other work, torch's OpenMP threads spin while they wait for each other: a
preempted one stalls the op while its peers burn the CPU it needs (under load, a 2-thread step can
take 10x a 1-thread one). `--torch-threads 1` or `--omp-wait-policy passive` (set for the engine and
the servers alike) take that out of the comparison; the defaults show what a user gets by default.
`--pin` puts the SDK on a CPU of its own and the engine and servers on another (1 torch thread), as
when the SDK runs on the user's machine: the official SDK spends ~10 ms of CPU per step, which on a
2-core box otherwise competes with the very step it waits for.

    python bench/service_overhead.py [--steps 6] [--hidden 512] [--layers 6] [--batch 8] [--seq-len 256]

The overhead-dominated configuration (a ~30 ms step, where the HTTP path shows most):
`--hidden 128 --layers 2 --batch 4 --seq-len 64 --steps 20`. `bench/service_profile.py` cuts a step
into its critical-path segments and each thread's CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MODEL_NAME = "bench/qwen3"
LEARNING_RATE = 1e-4


def build_model(directory: Path, *, hidden: int, layers: int) -> Path:
    """A randomly initialised Qwen3-architecture model with the default model's byte tokenizer."""
    import shutil

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tether.engine.default_model import ensure_default_model

    tokenizer_dir = ensure_default_model()
    config = Qwen3Config(
        vocab_size=264,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(directory)
    for file in tokenizer_dir.iterdir():
        if file.name.startswith("tokenizer") or file.name == "special_tokens_map.json":
            shutil.copy(file, directory / file.name)
    return directory


def make_batch(batch: int, seq_len: int) -> list[tuple[list[int], list[int]]]:
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(batch):
        ids = [rng.randrange(32, 127) for _ in range(seq_len + 1)]
        rows.append((ids[:-1], ids[1:]))
    return rows


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def engine_stepper(model_dir: Path, args: argparse.Namespace) -> Callable[[], float]:
    """One SFT step (forward_backward + optim_step) on a `TrainingEngine` in this process; returns seconds."""
    import torch

    from tether.engine.lora import LoraSpec
    from tether.engine.model_loading import load_base_model
    from tether.engine.training_engine import TrainingEngine
    from tether.engine.training_types import AdamWParams, EngineDatum

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    engine = TrainingEngine(load_base_model(MODEL_NAME, aliases={MODEL_NAME: str(model_dir)}))
    engine.create_model("local", lora=LoraSpec(rank=args.rank, seed=0))
    data = [
        EngineDatum(torch.tensor(x), {"target_tokens": torch.tensor(y), "weights": torch.ones(len(y))})
        for x, y in make_batch(args.batch, args.seq_len)
    ]

    def step() -> float:
        start = time.perf_counter()
        engine.forward_backward("local", data, "cross_entropy")
        step.parts["forward_backward"] = time.perf_counter() - start  # type: ignore[attr-defined]
        engine.optim_step("local", AdamWParams(learning_rate=LEARNING_RATE))
        seconds = time.perf_counter() - start
        step.parts["optim_step"] = seconds - step.parts["forward_backward"]  # type: ignore[attr-defined]
        return seconds

    step.parts = {}  # type: ignore[attr-defined]
    return step


def engine_child(model_dir: Path, args: argparse.Namespace) -> None:
    """`--engine-child DIR`: the engine baseline as a process; one step per `step` line on stdin."""
    import torch

    step = engine_stepper(model_dir, args)
    print(json.dumps({"torch_threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        print(json.dumps({"seconds": step(), **step.parts}), flush=True)  # type: ignore[attr-defined]


class EngineProcess:
    """The engine baseline in a child process (this file with `--engine-child`)."""

    def __init__(self, model_dir: Path, args: argparse.Namespace) -> None:
        command = [
            sys.executable, __file__, "--engine-child", str(model_dir),
            "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--rank", str(args.rank),
        ]  # fmt: skip
        if args.torch_threads:
            command += ["--torch-threads", str(args.torch_threads)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.torch_threads = self._read()["torch_threads"]
        self.parts: dict[str, float] = {}
        """The last step's forward_backward and optim_step seconds."""

    def _read(self) -> dict:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the engine process exited with {self.process.wait()}")
        return json.loads(line)

    def step(self) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        answer = self._read()
        self.parts = {k: v for k, v in answer.items() if k != "seconds"}
        return answer["seconds"]

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


def sdk_stepper(client, rows: list[tuple[list[int], list[int]]]) -> Callable[[], float]:  # type: ignore[no-untyped-def]
    """One SFT step through the official SDK: both calls are sent before either result is awaited."""
    from tinker import types

    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(x),
            loss_fn_inputs={"target_tokens": y, "weights": [1.0] * len(y)},
        )
        for x, y in rows
    ]

    def step() -> float:
        start = time.perf_counter()
        fwd = client.forward_backward(data, "cross_entropy")
        opt = client.optim_step(types.AdamParams(learning_rate=LEARNING_RATE))
        fwd.result()
        opt.result()
        return time.perf_counter() - start

    return step


def summary(label: str, times: list[float]) -> str:
    q1, med, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    ms = [t * 1000 for t in (statistics.median(times), q1, q3, min(times), max(times))]
    return f"{label:36}" + "".join(f"{value:9.1f}" for value in ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads of the engine and of every server's trainer (unset: each process's default)",
    )
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="the old layout: servers as threads and the engine in this process (one GIL for all)",
    )
    parser.add_argument(
        "--omp-wait-policy",
        choices=["passive", "active"],
        default=None,
        help="OMP_WAIT_POLICY for every process (engine and servers alike; unset: the environment's)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the SDK on its own CPU, as on a user's machine: the engine and the servers (and their trainer "
        "processes) on the first CPU of this process's affinity, with 1 torch thread unless --torch-threads, "
        "this process (the SDK) on the others; not with --same-process",
    )
    parser.add_argument("--engine-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pin and args.same_process:
        parser.error("--pin needs each server and the engine in a process of their own (not --same-process)")
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs at least 2 CPUs in this process's affinity")
    if args.omp_wait_policy:  # before anything loads torch (and its OpenMP runtime) here or in a child
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    if args.engine_child is not None:
        engine_child(args.engine_child, args)
        return
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    load_at_start = load_average()

    import tinker

    work = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    model_dir = build_model(work / "model", hidden=args.hidden, layers=args.layers)
    aliases = {MODEL_NAME: str(model_dir)}

    servers: list = []
    if args.same_process:
        from tether.server.config import ServerConfig
        from tether.server.main import ServerThread

        engine_step = engine_stepper(model_dir, args)
        import torch

        engine_threads = torch.get_num_threads()
        for trainer_process in (False, True):
            thread = ServerThread(
                ServerConfig(
                    port=0,
                    data_dir=work / f"data-{trainer_process}",
                    models=[MODEL_NAME],
                    model_aliases=aliases,
                    trainer_process=trainer_process,
                    torch_threads=args.torch_threads,
                )
            )
            servers.append((thread.start(), thread.stop))
    else:
        from tether.client.local_server import LocalServer

        cpus = sorted(os.sched_getaffinity(0))
        if args.pin:  # children inherit this process's affinity at spawn
            args.torch_threads = args.torch_threads or 1
            os.sched_setaffinity(0, cpus[:1])
        engine = EngineProcess(model_dir, args)
        engine_step, engine_threads = engine.step, engine.torch_threads
        for trainer_process in (False, True):
            extra = ["--models", MODEL_NAME, "--model-aliases", f"{MODEL_NAME}={model_dir}"]
            extra += ["--trainer-process"] if trainer_process else []
            extra += ["--torch-threads", str(args.torch_threads)] if args.torch_threads else []
            local = LocalServer(data_dir=work / f"data-{trainer_process}", extra_args=extra)
            servers.append((local.base_url, local.stop))
        if args.pin:
            os.sched_setaffinity(0, cpus[1:])

    try:
        services = [tinker.ServiceClient(base_url=url, api_key="tml-bench") for url, _ in servers]
        steps = [
            sdk_stepper(
                s.create_lora_training_client(base_model=MODEL_NAME, rank=args.rank, seed=0).result(),
                make_batch(args.batch, args.seq_len),
            )
            for s in services
        ]
        for step in steps:  # warm-up: first-use costs (thread pools, connections) are not per-step costs
            step()
            step()
        engine_step()
        engine_step()
        times: list[list[float]] = [[], [], []]
        for _ in range(args.steps):
            for index, step in enumerate((engine_step, *steps)):
                times[index].append(step())
        for s in services:
            s.close("success")
    finally:
        for _, stop in servers:
            stop()
        if not args.same_process:
            engine.close()

    eng, svc, proc = (statistics.median(t) for t in times)
    threads = args.torch_threads or "each process's default"
    tokens = args.batch * args.seq_len
    print(
        f"model: Qwen3 hidden={args.hidden} layers={args.layers}, LoRA rank {args.rank}; "
        f"batch {args.batch} x {args.seq_len} tokens ({tokens} tokens/step); {args.steps} steps each, alternating"
    )
    print(
        f"layout: {'one process (servers as threads, engine in it)' if args.same_process else 'SDK here, each server and the engine its own process'}; "
        f"CPUs {len(os.sched_getaffinity(0))}"
        + (
            f" (pinned: SDK on {sorted(os.sched_getaffinity(0))}, engine and servers on the other)"
            if args.pin
            else ""
        )
        + f"; torch threads: engine {engine_threads}, servers {threads}; "
        f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    print(f"load average at start {load_at_start}, at end {load_average()}")
    print(f"{'ms per step':36}{'median':>9}{'q1':>9}{'q3':>9}{'min':>9}{'max':>9}")
    labels = ("engine alone", "tinker SDK + server (in-process)", "tinker SDK + server (trainer proc)")
    for label, values in zip(labels, times, strict=True):
        print(summary(label, values))

    def paired(service: list[float], base: list[float]) -> str:
        ratios = [s / b for s, b in zip(service, base, strict=True)]
        q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        return f"per-round median {med:.3f} (q1 {q1:.3f}, q3 {q3:.3f})"

    print(f"ratio service/engine: {svc / eng:.3f} (target <= 1.10); {paired(times[1], times[0])}")
    print(f"ratio trainer-process service/engine: {proc / eng:.3f}; {paired(times[2], times[0])}")
    print(
        f"ratio trainer-process/in-process service: {proc / svc:.3f} (target <= 1.10); {paired(times[2], times[1])}"
    )


if __name__ == "__main__":
    main()
