"""Time from `tether serve` start to a new client's first completed `forward_backward`.

Starts `python -m tether serve` as a subprocess (a fresh data directory each run), waits for readiness
as a user would (polling `GET /api/v1/healthz` until it answers 200), then, with the official tinker
SDK, creates a LoRA training client and runs one `forward_backward`. Prints per run: seconds to
ready, to the training client, and to the first completed forward_backward, all from the moment the
process was started.

`--compare-with DIR` (repeatable) runs the same client against the `tether serve` of another checkout
(e.g. a `git worktree` of an older commit) too, runs alternating, and prints them side by side with
the ratio of each median to this tree's. The machine's load average is printed before and after (a
shared machine's load moves these figures more than anything):

    python bench/first_step.py [--runs 3] [--hidden 512] [--layers 6] [--compare-with /tmp/before ...]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
MODEL_NAME = "bench/qwen3"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_step(tree: Path, model_dir: Path, *, rank: int, batch: int, seq_len: int, timeout_s: float) -> dict:
    """One run against the `tether serve` of checkout `tree`: seconds from process start to each milestone."""
    import tinker
    from service_overhead import make_batch
    from tinker import types

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = Path(tempfile.mkdtemp(prefix="tether-first-step-"))
    command = [
        sys.executable,
        "-m",
        "tether",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir / "data"),
        "--models",
        MODEL_NAME,
        "--model-aliases",
        f"{MODEL_NAME}={model_dir}",
    ]
    env = {**os.environ, "PYTHONPATH": str(tree), "TINKER_TELEMETRY": "0"}
    log = open(data_dir / "serve.log", "wb")  # noqa: SIM115 - the child writes it for its lifetime
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = None
        with httpx.Client(timeout=2.0) as http:
            while ready is None:
                if process.poll() is not None:
                    raise RuntimeError(f"tether serve exited: {(data_dir / 'serve.log').read_text()[-2000:]}")
                if time.perf_counter() - start > timeout_s:
                    raise TimeoutError(f"tether serve was not ready in {timeout_s:.0f} s")
                try:
                    if http.get(f"{url}/api/v1/healthz").status_code == 200:
                        ready = time.perf_counter() - start
                except httpx.TransportError:
                    pass
                if ready is None:
                    time.sleep(0.05)
        service = tinker.ServiceClient(base_url=url, api_key="tml-bench")
        client = service.create_lora_training_client(base_model=MODEL_NAME, rank=rank, seed=0)
        created = time.perf_counter() - start
        data = [
            types.Datum(
                model_input=types.ModelInput.from_ints(x),
                loss_fn_inputs={"target_tokens": y, "weights": [1.0] * len(y)},
            )
            for x, y in make_batch(batch, seq_len)
        ]
        client.forward_backward(data, "cross_entropy").result()
        first = time.perf_counter() - start
        cpu = _cpu_seconds(process.pid)
        service.close("success")
        return {"ready": ready, "client": created, "forward_backward": first, "cpu": cpu}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) process `pid` has used: on a shared machine it moves
    far less with the load than wall time does. NaN where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument(
        "--compare-with",
        type=Path,
        action="append",
        default=[],
        help="another checkout whose `tether serve` to time too (repeatable)",
    )
    args = parser.parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    sys.path.insert(0, str(HERE))
    from service_overhead import build_model

    work = Path(tempfile.mkdtemp(prefix="tether-first-step-model-"))
    model_dir = build_model(work / "model", hidden=args.hidden, layers=args.layers)
    trees = {"this tree": HERE.parent}
    for other in args.compare_with:
        trees[str(other)] = other.resolve()
    results: dict[str, list[dict]] = {label: [] for label in trees}
    load_before = os.getloadavg()
    for _ in range(args.runs):
        for label, tree in trees.items():
            results[label].append(
                first_step(
                    tree,
                    model_dir,
                    rank=args.rank,
                    batch=args.batch,
                    seq_len=args.seq_len,
                    timeout_s=args.timeout_s,
                )
            )
    print(
        f"model: Qwen3 hidden={args.hidden} layers={args.layers}, LoRA rank {args.rank}; first forward_backward "
        f"of {args.batch} x {args.seq_len} tokens; {args.runs} runs each, alternating; seconds from process start"
    )
    print(f"load average (1, 5, 15 min): before {_load(load_before)}, after {_load(os.getloadavg())}")
    keys = ("ready", "client", "forward_backward", "cpu")
    print("ready ... first fwd_bwd: wall seconds from process start; server CPU: its CPU seconds until then")
    print(f"{'':40}{'ready (healthz)':>17}{'training client':>17}{'first fwd_bwd':>15}{'server CPU':>12}")
    ours = [statistics.median(r[key] for r in results["this tree"]) for key in keys]

    def row(label: str, values: list[float]) -> str:
        return f"{label:40}{values[0]:17.2f}{values[1]:17.2f}{values[2]:15.2f}{values[3]:12.2f}"

    for label, runs in results.items():
        medians = [statistics.median(r[key] for r in runs) for key in keys]
        print(row(label + " (median)", medians))
        for r in runs:
            print(row("  run", [r[key] for key in keys]))
        if label != "this tree":
            print(row("  its median / this tree", [m / o for m, o in zip(medians, ours, strict=True)]))


def _load(load: tuple[float, float, float]) -> str:
    return ", ".join(f"{x:.1f}" for x in load)


if __name__ == "__main__":
    main()
