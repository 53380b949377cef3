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

`--baseline one-at-a-time` measures batching inside the engine instead: `--prompts` prompts
(mixed lengths) with `--group` seeded samples each, submitted together (prefilled in batched
forward passes, each group sharing its prompt's prefill, decoded together) vs submitted one after
the other on the same engine. It also times the prefill alone: `prefill_batch` of all prompts vs
one `prefill` per prompt. Same tokens on both sides are checked and printed.

    python bench/sampling_throughput.py [--model tether/tiny-qwen3] [--baseline sequential|padded|both]
    python bench/sampling_throughput.py --baseline one-at-a-time [--prompts 8 --group 4]
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import torch

from tether.engine.default_model import DEFAULT_MODEL_NAME
from tether.engine.model_loading import LoadedBaseModel, load_base_model
from tether.engine.sampling import SampleRequest, SampleResult, SamplingEngine
from tether.engine.sampling.model_runner import PrefillPrompt, prefill, prefill_batch
from tether.engine.sampling.scheduler import DEFAULT_PREFILL_FORWARD_COST_TOKENS, prefill_batches


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


def group_requests(
    num_prompts: int, group: int, lengths: tuple[int, int], vocab_size: int, seed: int
) -> list[SampleRequest]:
    """Prompts of distinct lengths in `lengths` (inclusive), `group` seeded samples of 32 tokens
    each (no stops: equal work)."""
    rng = random.Random(seed)
    prompt_lengths = rng.sample(range(lengths[0], lengths[1] + 1), num_prompts)
    return [
        SampleRequest(
            [rng.randrange(min(vocab_size, 256)) for _ in range(prompt_lengths[i])],
            num_samples=group,
            max_tokens=32,
            temperature=1.0,
            seed=1000 + i,
            stop=[],
        )
        for i in range(num_prompts)
    ]


def run_requests(
    base: LoadedBaseModel, requests: list[SampleRequest], together: bool, forward_cost: float
) -> tuple[float, list[SampleResult]]:
    """All requests queued at once (admitted, prefilled and decoded together) or one after another."""
    engine = SamplingEngine(
        base,
        max_batch_size=max(64, sum(r.num_samples for r in requests)),
        prefill_forward_cost_tokens=forward_cost,
    )
    try:
        engine.submit(SampleRequest([1, 2, 3], max_tokens=4, temperature=0.0)).result()  # warm-up
        start = time.perf_counter()
        if together:
            with engine._cond:  # queue all before the engine's loop admits any (as a busy engine would)
                futures = [engine.submit(r) for r in requests]
            results = [f.result() for f in futures]
        else:
            results = [engine.submit(r).result() for r in requests]
        return time.perf_counter() - start, results
    finally:
        engine.close()


def time_prefill(
    base: LoadedBaseModel, prompts: list[list[int]], plan: list[list[int]], repeats: int = 3
) -> tuple[float, float]:
    """Best-of-`repeats` seconds: the prompts prefilled in the batches of `plan` (as the engine
    would), and one prefill per prompt (interleaved)."""
    batched, alone = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in plan:
            prefill_batch(base.model, [PrefillPrompt(prompts[i]) for i in batch])
        batched.append(time.perf_counter() - start)
        start = time.perf_counter()
        for p in prompts:
            prefill(base.model, None, p)
        alone.append(time.perf_counter() - start)
    return min(batched), min(alone)


def compare_batching(
    base: LoadedBaseModel,
    requests: list[SampleRequest],
    forward_cost: float,
    prefill_only: bool,
    repeats: int,
) -> None:
    """Print best-of-`repeats` times and ratios: batched prefill vs one forward per prompt, then
    the engine with requests together (batched prefill; one prefill forward per prompt, as before
    batched prefill) vs one request at a time."""
    prompts = [list(r.prompt_tokens) for r in requests]
    print(
        f"{len(prompts)} prompts ({sum(map(len, prompts))} tokens, {min(map(len, prompts))}-"
        f"{max(map(len, prompts))} each) x group {requests[0].num_samples}, 32 tokens per sample;"
        f" best of {repeats}"
    )
    plan = prefill_batches([len(p) for p in prompts], forward_cost)
    batched_prefill_s, alone_prefill_s = time_prefill(base, prompts, plan, repeats)
    sizes = [len(b) for b in plan]
    print(f"prefill only, batched ({len(plan)} forwards {sizes}): {batched_prefill_s:7.3f} s")
    print(f"prefill only, one forward per prompt:      {alone_prefill_s:7.3f} s")
    print(f"ratio prefill one-per-prompt / batched: {alone_prefill_s / batched_prefill_s:.2f}x")
    if prefill_only:
        return
    # Distinct lengths and a free forward pass (cost 0): every prompt its own prefill forward.
    variants = {
        "together": (True, forward_cost),
        "together-unbatched-prefill": (True, 0.0),
        "one-at-a-time": (False, 0.0),
    }
    best: dict[str, float] = {}
    outputs: dict[str, list[SampleResult]] = {}
    names = list(variants)
    for repeat in range(repeats):  # interleaved and rotated: load changes on a shared machine hit all
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            together, cost = variants[name]
            seconds, outputs[name] = run_requests(base, requests, together, cost)
            best[name] = min(best.get(name, seconds), seconds)
    num_tokens = sum(len(s.tokens) for r in outputs["together"] for s in r.sequences)
    for name, seconds in best.items():
        same = sum(
            [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
            for a, b in zip(outputs[name], outputs["one-at-a-time"], strict=True)
        )
        print(
            f"engine, {name:28s} {seconds:7.2f} s  {num_tokens / seconds:8.1f} tok/s  (same tokens {same}/{len(requests)})"
        )
    print(f"ratio together / one-at-a-time:              {best['one-at-a-time'] / best['together']:.2f}x")
    print(
        "ratio together / together-unbatched-prefill: "
        f"{best['together-unbatched-prefill'] / best['together']:.2f}x  (the gain of batched prefill alone)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--baseline", choices=["sequential", "padded", "both", "one-at-a-time"], default="both"
    )
    parser.add_argument("--prompts", type=int, default=8, help="one-at-a-time: prompts sent together")
    parser.add_argument("--group", type=int, default=4, help="one-at-a-time: samples per prompt")
    parser.add_argument(
        "--prefill-forward-cost-tokens",
        type=float,
        default=DEFAULT_PREFILL_FORWARD_COST_TOKENS,
        help="one-at-a-time: the engine's cost of a prefill forward pass, in tokens (batching vs padding)",
    )
    parser.add_argument("--prefill-only", action="store_true", help="one-at-a-time: time the prefill only")
    parser.add_argument(
        "--prompt-lengths", default="32,384", help="one-at-a-time: min,max prompt tokens (distinct lengths)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="one-at-a-time: best of this many runs")
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
    if args.baseline == "one-at-a-time":
        print(f"model {args.model}; torch threads {torch.get_num_threads()}")
        low, high = (int(n) for n in args.prompt_lengths.split(","))
        compare_batching(
            base,
            group_requests(args.prompts, args.group, (low, high), base.vocab_size, args.seed),
            args.prefill_forward_cost_tokens,
            args.prefill_only,
            args.repeats,
        )
        return
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
