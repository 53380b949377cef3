"""Where a service step's time goes: the critical path of one SFT step through the official tinker SDK
and a `tether serve` process, cut into segments, and the CPU each process spent per step.

The layout is `bench/service_overhead.py`'s: the server is its own process (`--trainer-process`: its
trainer too), the SDK runs here, the engine baseline in a child process; steps alternate with the
engine's. `bench/profile_hooks/sitecustomize.py`, loaded into the server and trainer processes,
writes timing marks (perf_counter is CLOCK_MONOTONIC on Linux: comparable across processes). The
segments (medians over the steps, ms):

  A   SDK call -> route submits forward_backward   SDK encode, HTTP, route decode and checks
   A0 SDK call -> the request reaches the app      (the SDK, the socket, uvicorn's parsing)
   A1 the app -> route submits                     (middleware, route decode and checks)
  A'  submitted -> worker starts it                 queue hand-off (trainer process: op socket)
  B   forward_backward on the worker                compare with the engine's
  B'  gap before optim_step starts                  the optim_step was queued while B ran: ~0
  B"  optim_step on the worker                      compare with the engine's
  C1  worker done -> result thread runs finish      hand-off (trainer process: result socket)
  C2  finish (encode, run metrics)
  C3  finish done -> long poll answered             future wake-up on the event loop
  C4  long poll answered -> the SDK has the result  HTTP response, SDK decode, user thread wake-up
   C4a poll answered -> response handed to the socket
   C4b response sent -> the SDK has the result     (the socket, the SDK)

`--null-trainer`: the worker answers each op with its kind's first result at once, so the step time
is the service's floor (what it adds to any step), free of the compute's noise.

    python bench/service_profile.py [--steps 60] [--trainer-process] [--torch-threads N] [--hidden 128] ...
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HOOKS = Path(__file__).parent / "profile_hooks"


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of every thread of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--trainer-process", action="store_true")
    parser.add_argument(
        "--null-trainer",
        action="store_true",
        help="the worker answers each op with the first result of its kind, without compute: the service's floor",
    )
    args = parser.parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    load_at_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])

    import tinker
    from service_overhead import MODEL_NAME, EngineProcess, build_model, make_batch

    from tether.client.local_server import LocalServer

    work = Path(tempfile.mkdtemp(prefix="tether-profile-"))
    model_dir = build_model(work / "model", hidden=args.hidden, layers=args.layers)
    marks_file = work / "marks"
    marks_file.touch()
    engine = EngineProcess(model_dir, args)
    extra = ["--models", MODEL_NAME, "--model-aliases", f"{MODEL_NAME}={model_dir}"]
    extra += ["--trainer-process"] if args.trainer_process else []
    extra += ["--torch-threads", str(args.torch_threads)] if args.torch_threads else []
    saved = {
        k: os.environ.get(k) for k in ("PYTHONPATH", "TETHER_PROFILE_MARKS", "TETHER_PROFILE_NULL_TRAINER")
    }
    if args.null_trainer:
        os.environ["TETHER_PROFILE_NULL_TRAINER"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HOOKS), saved["PYTHONPATH"]]))
    os.environ["TETHER_PROFILE_MARKS"] = str(marks_file)
    try:
        server = LocalServer(data_dir=work / "data", extra_args=extra)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    service = tinker.ServiceClient(base_url=server.base_url, api_key="tml-bench")
    client = service.create_lora_training_client(base_model=MODEL_NAME, rank=args.rank, seed=0).result()
    from tinker import types

    rows = make_batch(args.batch, args.seq_len)
    sdk_data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(x),
            loss_fn_inputs={"target_tokens": y, "weights": [1.0] * len(y)},
        )
        for x, y in rows
    ]
    segments: dict[str, list[float]] = collections.defaultdict(list)
    engine_parts: dict[str, list[float]] = collections.defaultdict(list)
    marks_in = open(marks_file)  # noqa: SIM115 - read as the servers write

    def service_step(record: bool) -> None:
        marks_in.read()  # skip what came before this step
        start = time.perf_counter()
        fwd = client.forward_backward(sdk_data, "cross_entropy")
        opt = client.optim_step(types.AdamParams(learning_rate=1e-4))
        fwd.result()
        got_fwd = time.perf_counter()
        opt.result()
        end = time.perf_counter()
        time.sleep(0.002)  # the last marks' lines reach the file
        m: dict[str, float] = {}  # the first time of each mark in this step
        last: dict[str, float] = {}
        for line in marks_in.read().splitlines():
            name, _, value = line.rpartition(" ")
            m.setdefault(name, float(value))
            last[name] = float(value)
        if not record:
            return
        segments["step"].append(end - start)
        segments["A   SDK call -> route submits fwd_bwd"].append(m["submit-ForwardBackward"] - start)
        segments["  A0  SDK call -> request reaches the app"].append(m["http-in-forward_backward"] - start)
        segments["  A1  app -> route submits"].append(
            m["submit-ForwardBackward"] - m["http-in-forward_backward"]
        )
        segments["A'  submitted -> worker starts it"].append(
            m["worker-start-ForwardBackward"] - m["submit-ForwardBackward"]
        )
        segments["B   forward_backward on the worker"].append(
            m["worker-end-ForwardBackward"] - m["worker-start-ForwardBackward"]
        )
        segments["B'  gap before optim_step starts"].append(
            m["worker-start-OptimStep"] - m["worker-end-ForwardBackward"]
        )
        segments['B"  optim_step on the worker'].append(
            m["worker-end-OptimStep"] - m["worker-start-OptimStep"]
        )
        segments["C1  worker done -> finish starts"].append(
            m["finish-start-MetricsOutput"] - m["worker-end-OptimStep"]
        )
        segments["C2  finish"].append(m["finish-end-MetricsOutput"] - m["finish-start-MetricsOutput"])
        segments["C3  finish done -> poll answered"].append(
            m["poll-answer-optim"] - m["finish-end-MetricsOutput"]
        )
        segments["C4  poll answered -> SDK has result"].append(end - m["poll-answer-optim"])
        segments["  C4a poll answered -> response sent"].append(
            last["http-out-retrieve_future"] - m["poll-answer-optim"]
        )
        segments["  C4b response sent -> SDK has result"].append(end - last["http-out-retrieve_future"])
        segments["(fwd_bwd: worker done -> SDK has it)"].append(got_fwd - m["worker-end-ForwardBackward"])

    def engine_step() -> None:
        engine.step()
        for key, value in engine.parts.items():
            engine_parts[key].append(value)
        engine_parts["step"].append(sum(engine.parts.values()))

    for _ in range(3):  # warm-up
        service_step(record=False)
        engine_step()
    engine_parts.clear()
    pids = {"server": server._process.pid, "sdk (this process)": os.getpid(), "engine": engine.process.pid}
    for child in children(server._process.pid):
        pids["trainer process"] = child
    before = {name: process_cpu(pid) for name, pid in pids.items()}
    engine_cpu = 0.0
    for _ in range(args.steps):
        cpu = process_cpu(pids["engine"])
        engine_step()
        engine_cpu += process_cpu(pids["engine"]) - cpu
        service_step(record=True)
    after = {name: process_cpu(pid) for name, pid in pids.items()}
    service.close("success")
    server.stop()
    engine.close()

    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(
        f"model: Qwen3 hidden={args.hidden} layers={args.layers}, LoRA rank {args.rank}; batch {args.batch} x "
        f"{args.seq_len} tokens; {args.steps} steps each, alternating; "
        f"{'NULL TRAINER (no compute); ' if args.null_trainer else ''}trainer "
        f"{'in a trainer process' if args.trainer_process else 'in the server process'}; torch threads "
        f"{engine.torch_threads} (engine), {args.torch_threads or 'default'} (server)"
    )
    print(f"load average at start {load_at_start}, at end {load}")
    print(f"{'ms per step':44}{'median':>9}{'q1':>9}{'q3':>9}")

    def row(label: str, times: list[float]) -> None:
        q1, med, q3 = statistics.quantiles(times, n=4)
        print(f"{label:44}" + "".join(f"{v * 1000:9.2f}" for v in (med, q1, q3)))

    for label, times in engine_parts.items():
        row(f"engine {label}", times)
    for label, times in segments.items():
        row(f"service {label}", times)
    print("CPU ms per step, by process:")
    print(f"  {'engine (during its steps)':42}{engine_cpu / args.steps * 1000:9.2f}")
    for name in pids:
        if name != "engine":
            print(f"  {name:42}{(after[name] - before[name]) / args.steps * 1000:9.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
