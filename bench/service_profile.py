"""Where a service step's time goes: the critical path of one SFT step through the tinker SDK and an
in-process `tether serve`, cut into segments, and the CPU each thread spent per step.

Steps alternate with the same step on the engine in-process (as in `bench/service_overhead.py`).
The segments (medians over the steps):

  A  submit -> worker starts forward_backward   SDK encode, HTTP round trip, route, queueing
  B  forward_backward on the worker              compare with the engine's forward_backward
  B' gap before optim_step starts                the optim_step was queued while B ran: ~0
  B" optim_step on the worker                    compare with the engine's optim_step
  C  worker done -> the SDK has both results     result thread, long-poll wake-up, HTTP, SDK

CPU per thread comes from /proc (Linux), in ms per (engine step + service step). It wraps
`ModelWorker._run_one` to time the ops (the worker runs a lone tenant's ops one at a time).

    python bench/service_profile.py [--steps 40] [--hidden 128] [--layers 2] [--batch 4] [--seq-len 64]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path


def cpu_by_thread() -> dict[tuple[int, str], float]:
    """CPU seconds per thread of this process, named by Python thread name where it has one."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            name = names.get(int(tid)) or Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[(int(tid), name.split(" (")[0].rstrip("_0123456789"))] = (
            int(fields[11]) + int(fields[12])
        ) / ticks
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")

    import tinker
    import torch
    from service_overhead import build_model, make_batch
    from tinker import types

    from tether.engine import worker
    from tether.engine.lora import LoraSpec
    from tether.engine.model_loading import load_base_model
    from tether.engine.training_engine import TrainingEngine
    from tether.engine.training_types import AdamWParams, EngineDatum
    from tether.server.config import ServerConfig
    from tether.server.main import ServerThread

    marks: dict[str, float] = {}
    run_one = worker.ModelWorker._run_one

    def timed_run_one(self, item):  # type: ignore[no-untyped-def]
        kind = type(item.op).__name__
        marks[f"start {kind}"] = time.perf_counter()
        run_one(self, item)
        marks[f"end {kind}"] = time.perf_counter()

    worker.ModelWorker._run_one = timed_run_one  # type: ignore[method-assign]

    work = Path(tempfile.mkdtemp(prefix="tether-profile-"))
    model_dir = build_model(work / "model", hidden=args.hidden, layers=args.layers)
    name = "bench/qwen3"
    rows = make_batch(args.batch, args.seq_len)
    engine = TrainingEngine(load_base_model(name, aliases={name: str(model_dir)}))
    engine.create_model("local", lora=LoraSpec(rank=args.rank, seed=0))
    engine_data = [
        EngineDatum(torch.tensor(x), {"target_tokens": torch.tensor(y), "weights": torch.ones(len(y))})
        for x, y in rows
    ]
    sdk_data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(x),
            loss_fn_inputs={"target_tokens": y, "weights": [1.0] * len(y)},
        )
        for x, y in rows
    ]
    engine_times: dict[str, list[float]] = collections.defaultdict(list)
    segments: dict[str, list[float]] = collections.defaultdict(list)

    def engine_step() -> None:
        start = time.perf_counter()
        engine.forward_backward("local", engine_data, "cross_entropy")
        middle = time.perf_counter()
        engine.optim_step("local", AdamWParams(learning_rate=1e-4))
        end = time.perf_counter()
        engine_times["step"].append(end - start)
        engine_times["forward_backward"].append(middle - start)
        engine_times["optim_step"].append(end - middle)

    config = ServerConfig(port=0, data_dir=work / "data", models=[name], model_aliases={name: str(model_dir)})
    with ServerThread(config) as url:
        service = tinker.ServiceClient(base_url=url, api_key="tml-bench")
        client = service.create_lora_training_client(base_model=name, rank=args.rank, seed=0).result()

        def service_step() -> None:
            marks.clear()
            start = time.perf_counter()
            fwd = client.forward_backward(sdk_data, "cross_entropy")
            opt = client.optim_step(types.AdamParams(learning_rate=1e-4))
            fwd.result()
            opt.result()
            end = time.perf_counter()
            segments["step"].append(end - start)
            segments["A  submit -> forward_backward starts"].append(marks["start ForwardBackward"] - start)
            segments["B  forward_backward"].append(
                marks["end ForwardBackward"] - marks["start ForwardBackward"]
            )
            segments["B' gap"].append(marks["start OptimStep"] - marks["end ForwardBackward"])
            segments['B" optim_step'].append(marks["end OptimStep"] - marks["start OptimStep"])
            segments["C  worker done -> SDK has results"].append(end - marks["end OptimStep"])

        for _ in range(3):  # warm-up
            service_step()
            engine_step()
        segments.clear()
        engine_times.clear()
        before = cpu_by_thread()
        for _ in range(args.steps):
            engine_step()
            service_step()
        after = cpu_by_thread()
        service.close("success")

    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(
        f"model: Qwen3 hidden={args.hidden} layers={args.layers}, LoRA rank {args.rank}; batch {args.batch} x "
        f"{args.seq_len} tokens; {args.steps} steps each, alternating; load average {load}"
    )
    print(f"{'ms per step (median, min)':46}{'median':>9}{'min':>9}")
    for label, times in engine_times.items():
        print(f"{'engine ' + label:46}{statistics.median(times) * 1000:9.2f}{min(times) * 1000:9.2f}")
    for label, times in segments.items():
        print(f"{'service ' + label:46}{statistics.median(times) * 1000:9.2f}{min(times) * 1000:9.2f}")
    cpu: collections.Counter[str] = collections.Counter()
    for key, seconds in after.items():
        cpu[key[1]] += seconds - before.get(key, 0.0)
    print("CPU ms per (engine step + service step), by thread:")
    for thread, seconds in cpu.most_common():
        if seconds > 0:
            print(f"  {thread:44}{seconds / args.steps * 1000:9.2f}")


if __name__ == "__main__":
    main()
