"""Time from `tether serve` start to a new client's first completed `forward_backward`.

Starts `python -m tether serve` as a subprocess (a fresh data directory each run), waits for readiness
as a user would (polling `GET /api/v1/healthz` until it answers 200), then, with the official tinker
SDK, creates a LoRA training client and runs one `forward_backward`. Prints per run: seconds to
ready, to the training client, and to the first completed forward_backward, all from the moment the
process was started.

`--compare-with DIR` runs the same client against the `tether serve` of another checkout (e.g. a
`git worktree` of an older commit) too, runs alternating, and prints both side by side:

    python bench/first_step.py [--runs 3] [--hidden 512] [--layers 6] [--compare-with /tmp/before]
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
        service.close("success")
        return {"ready": ready, "client": created, "forward_backward": first}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


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
        "--compare-with", type=Path, default=None, help="another checkout whose `tether serve` to time too"
    )
    args = parser.parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    sys.path.insert(0, str(HERE))
    from service_overhead import build_model

    work = Path(tempfile.mkdtemp(prefix="tether-first-step-model-"))
    model_dir = build_model(work / "model", hidden=args.hidden, layers=args.layers)
    trees = {"this tree": HERE.parent}
    if args.compare_with is not None:
        trees[str(args.compare_with)] = args.compare_with.resolve()
    results: dict[str, list[dict]] = {label: [] for label in trees}
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
    print(f"{'':40}{'ready (healthz)':>17}{'training client':>17}{'first fwd_bwd':>15}")
    for label, runs in results.items():
        medians = [statistics.median(r[key] for r in runs) for key in ("ready", "client", "forward_backward")]
        print(f"{label + ' (median)':40}{medians[0]:17.2f}{medians[1]:17.2f}{medians[2]:15.2f}")
        for r in runs:
            print(f"{'  run':40}{r['ready']:17.2f}{r['client']:17.2f}{r['forward_backward']:15.2f}")


if __name__ == "__main__":
    main()
