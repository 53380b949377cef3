"""Generated tokens per second: tether's sampling engine vs `transformers` `generate`, side by side.

Both serve the same 32 requests (mixed prompt and output lengths, fixed by a seed) on the same model
and weights. Every request generates exactly its `max_tokens` (the engine with `stop=[]`, generate
with `min_new_tokens`), greedily, so both do the same work and produce the same tokens.

Baselines:
- `sequential` (the headline ratio, target >= 2): `generate` runs the requests one by one, as a
  server without batching would.
- `padded`: `generate` runs all requests as one left-padded batch that lasts as long as the longest
  request (static batching: requests cannot join or leave; needs every request up front).

Both run by default (`--baseline both`). The engine receives all requests at once as concurrent
submissions and batches them continuously.

Both sides use the same number of torch threads (`--threads`, default 1: on a shared, busy CPU
extra OpenMP threads mostly wait for each other and distort both numbers).

    python bench/sampling_throughput.py [--model tether/tiny-qwen3] [--baseline sequential|padded|both]
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import torch

from tether.engine.default_model import DEFAULT_MODEL_NAME
from tether.engine.model_loading import LoadedBaseModel, load_base_model
from tether.engine.sampling import SampleRequest, SamplingEngine


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int]
    max_tokens: int


def make_requests(num_requests: int, vocab_size: int, seed: int) -> list[BenchRequest]:
    """Prompts of 8-160 tokens and outputs of 16-128 tokens, drawn reproducibly."""
    rng = random.Random(seed)
    return [
        BenchRequest(
            prompt=[rng.randrange(min(vocab_size, 256)) for _ in range(rng.randint(8, 160))],
            max_tokens=rng.randint(16, 128),
        )
        for _ in range(num_requests)
    ]


def run_engine(base: LoadedBaseModel, requests: list[BenchRequest]) -> tuple[float, list[list[int]]]:
    engine = SamplingEngine(base, max_batch_size=max(64, len(requests)))
    try:
        engine.submit(SampleRequest([1, 2, 3], max_tokens=4, temperature=0.0)).result()  # warm-up
        start = time.perf_counter()
        futures = [
            engine.submit(SampleRequest(r.prompt, max_tokens=r.max_tokens, temperature=0.0, stop=[]))
            for r in requests
        ]
        outputs = [f.result().sequences[0].tokens for f in futures]
        return time.perf_counter() - start, outputs
    finally:
        engine.close()


@torch.inference_mode()
def run_generate_sequential(
    base: LoadedBaseModel, requests: list[BenchRequest]
) -> tuple[float, list[list[int]]]:
    model = base.model
    pad = model.generation_config.pad_token_id
    model.generate(
        torch.tensor([[1, 2, 3]], device=model.device), max_new_tokens=4, do_sample=False, pad_token_id=pad
    )  # warm-up
    start = time.perf_counter()
    outputs = []
    for r in requests:
        ids = torch.tensor([r.prompt], device=model.device)
        out = model.generate(
            ids, max_new_tokens=r.max_tokens, min_new_tokens=r.max_tokens, do_sample=False, pad_token_id=pad
        )
        outputs.append(out[0, len(r.prompt) :].tolist())
    return time.perf_counter() - start, outputs


@torch.inference_mode()
def run_generate_padded(base: LoadedBaseModel, requests: list[BenchRequest]) -> tuple[float, list[list[int]]]:
    """One left-padded batch; each row is cut at its own max_tokens (the batch runs to the longest)."""
    model = base.model
    pad = model.generation_config.pad_token_id
    longest_prompt = max(len(r.prompt) for r in requests)
    ids = torch.full((len(requests), longest_prompt), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, r in enumerate(requests):
        ids[row, longest_prompt - len(r.prompt) :] = torch.tensor(r.prompt)
        mask[row, longest_prompt - len(r.prompt) :] = 1
    longest_output = max(r.max_tokens for r in requests)
    start = time.perf_counter()
    out = model.generate(
        ids.to(model.device),
        attention_mask=mask.to(model.device),
        max_new_tokens=longest_output,
        min_new_tokens=longest_output,
        do_sample=False,
        pad_token_id=pad,
    )
    elapsed = time.perf_counter() - start
    return elapsed, [
        out[row, longest_prompt : longest_prompt + r.max_tokens].tolist() for row, r in enumerate(requests)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", choices=["sequential", "padded", "both"], default="both")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for both sides (1 resists a busy machine)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (both sides)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = load_base_model(args.model, device=args.device, dtype=args.dtype)
    requests = make_requests(args.num_requests, base.vocab_size, args.seed)
    num_tokens = sum(r.max_tokens for r in requests)
    print(
        f"model {args.model}: {len(requests)} requests, prompts {sum(len(r.prompt) for r in requests)} tokens,"
        f" {num_tokens} tokens to generate; torch threads {torch.get_num_threads()}"
    )
    engine_s, engine_out = run_engine(base, requests)
    engine_tps = num_tokens / engine_s
    print(f"tether engine (continuous batching): {engine_s:7.2f} s  {engine_tps:8.1f} tok/s")
    baselines = ["sequential", "padded"] if args.baseline == "both" else [args.baseline]
    for name in baselines:
        runner = run_generate_sequential if name == "sequential" else run_generate_padded
        baseline_s, baseline_out = runner(base, requests)
        baseline_tps = num_tokens / baseline_s
        same = sum(a == b for a, b in zip(engine_out, baseline_out, strict=True))
        print(f"transformers generate ({name}):    {baseline_s:7.2f} s  {baseline_tps:8.1f} tok/s")
        print(
            f"ratio engine / generate ({name}): {engine_tps / baseline_tps:.2f}x  (same tokens: {same}/{len(requests)})"
        )


if __name__ == "__main__":
    main()
