"""What the service costs: one SFT step through the official tinker SDK + `tether serve` versus the same
step on the training engine in-process, with the server's trainer in-process and in a `tether trainer`
process (`--trainer-process`: ops cross a local socket).

All three train the same LoRA on the same base model and batch; steps alternate (engine, in-process
service, out-of-process service, ...) so machine noise hits all alike. Prints the median step time of
each and the ratios (targets: service / engine <= 1.10; out-of-process / in-process <= 1.10).

    python bench/service_overhead.py [--steps 6] [--hidden 512] [--layers 6] [--batch 8] [--seq-len 256]

The overhead-dominated configuration (a ~25 ms step, where the HTTP path shows most):
`--hidden 128 --layers 2 --batch 4 --seq-len 64 --steps 20`. `bench/service_profile.py` cuts a step
into its critical-path segments and each thread's CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")

    import tinker
    import torch
    from tinker import types

    from tether.engine.lora import LoraSpec
    from tether.engine.model_loading import load_base_model
    from tether.engine.training_engine import TrainingEngine
    from tether.engine.training_types import AdamWParams, EngineDatum
    from tether.server.config import ServerConfig
    from tether.server.main import ServerThread

    work = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    model_dir = build_model(work / "model", hidden=args.hidden, layers=args.layers)
    name = "bench/qwen3"
    rows = make_batch(args.batch, args.seq_len)
    lr = 1e-4

    base = load_base_model(name, aliases={name: str(model_dir)})
    engine = TrainingEngine(base)
    engine.create_model("local", lora=LoraSpec(rank=args.rank, seed=0))
    engine_data = [
        EngineDatum(torch.tensor(x), {"target_tokens": torch.tensor(y), "weights": torch.ones(len(y))})
        for x, y in rows
    ]

    def engine_step() -> float:
        start = time.perf_counter()
        engine.forward_backward("local", engine_data, "cross_entropy")
        engine.optim_step("local", AdamWParams(learning_rate=lr))
        return time.perf_counter() - start

    sdk_data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(x),
            loss_fn_inputs={"target_tokens": y, "weights": [1.0] * len(y)},
        )
        for x, y in rows
    ]

    def server(trainer_process: bool) -> ServerThread:
        return ServerThread(
            ServerConfig(
                port=0,
                data_dir=work / ("data-tp" if trainer_process else "data"),
                models=[name],
                model_aliases={name: str(model_dir)},
                trainer_process=trainer_process,
            )
        )

    def sdk_step(client) -> float:
        start = time.perf_counter()
        fwd = client.forward_backward(sdk_data, "cross_entropy")
        opt = client.optim_step(types.AdamParams(learning_rate=lr))
        fwd.result()
        opt.result()
        return time.perf_counter() - start

    with server(False) as url, server(True) as url_tp:
        services = [tinker.ServiceClient(base_url=u, api_key="tml-bench") for u in (url, url_tp)]
        clients = [
            s.create_lora_training_client(base_model=name, rank=args.rank, seed=0).result() for s in services
        ]
        for client in clients:  # warm-up: first-use costs (thread pools, connections) are not per-step costs
            sdk_step(client)
        engine_step()
        engine_times: list[float] = []
        service_times: list[float] = []
        process_times: list[float] = []
        for _ in range(args.steps):
            engine_times.append(engine_step())
            service_times.append(sdk_step(clients[0]))
            process_times.append(sdk_step(clients[1]))
        for s in services:
            s.close("success")

    svc, eng, proc = (statistics.median(t) for t in (service_times, engine_times, process_times))
    tokens = args.batch * args.seq_len
    print(
        f"model: Qwen3 hidden={args.hidden} layers={args.layers}, LoRA rank {args.rank}; "
        f"batch {args.batch} x {args.seq_len} tokens ({tokens} tokens/step); {args.steps} steps each, alternating"
    )
    print(f"{'':34}{'median s/step':>14}{'min':>8}{'max':>8}")
    for label, times in (
        ("engine in-process", engine_times),
        ("tinker SDK + server (in-process)", service_times),
        ("tinker SDK + server (trainer proc)", process_times),
    ):
        print(f"{label:34}{statistics.median(times):14.3f}{min(times):8.3f}{max(times):8.3f}")
    print(f"ratio service/engine: {svc / eng:.3f} (target <= 1.10)")
    print(f"ratio trainer-process service/engine: {proc / eng:.3f}")
    print(f"ratio trainer-process/in-process service: {proc / svc:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
