"""Delta size: full sampler weights ÷ delta, for tether's delta and plain XOR+zstd, side by side.

A full fine-tuning of the default tiny model is trained with AdamW on text for 1, 5 and 20 steps at
learning rates 1e-5 and 1e-4, once per weight dtype: float32 (the CPU default) and bfloat16 (the GPU
default, "auto" in `tether.engine.model_loading`: weights, optimizer update and sampler weights all
bf16, as a full fine-tuning on a GPU saves them and vLLM serves them). The model is loaded through
`load_base_model(dtype=...)` and trained through the real `TrainingEngine`. After each step count the
sampler weights are compared with the weights before training:

* plain:  each tensor's bytes XOR the base's, `zstd` level 3 per tensor (the arc_v2 idea);
* tether: `tether.storage.delta.write_delta` (bit difference to the base, zigzag-mapped, elements
          ordered by the base's exponent, split in byte planes, each plane zstd level 3), the file
          a `delta` sampler checkpoint stores.

Both are exact. Printed: full bytes ÷ delta bytes for each, and tether ÷ plain (target ≥ 1.5).
`entropy ×` is full bytes ÷ an estimate of the information in the change: each float element's
move (target − base, in units of lr) histogrammed in bins of lr/16 (empirical entropy of the bin)
plus the bits that place it inside its bin at the element's precision (log2 of bin width ÷ ulp,
uniform), over the tensors the delta stores (a tied copy once). A coder treating elements
independently cannot beat it by much (conditioning on the tensor, on neighbouring elements or on
the base value lowers the bin entropy by < 0.1 bit per element on these runs), so `entropy ×` ÷
`plain ×` bounds what tether/plain can reach. (After one step the moves sit on a few exact values,
not spread inside their bins, so there the estimate is loose and tether beats it.)
For bfloat16 every move is a whole number of the element's ulps (at most 2^16 values), so no bins
are needed: the estimate is the empirical entropy of the move in ulps given the base element's
exponent (what tether's ordering exploits), summed over elements — exact for an order-0 coder that
knows each element's exponent, with no cost for the code table.
A chain (`tether.storage.sampler_chain`) takes each delta against the previous save, so the `chained ×`
column gives tether's full ÷ delta averaged over the one-step deltas of the same run so far, and
`chain t/p` plain ÷ tether summed over those one-step deltas (what a chain saved every step ships).

    PYTHONPATH=. python bench/delta_size.py [--steps 1 5 20] [--lrs 1e-5 1e-4] [--dtypes float32 bfloat16]
        [--batch 8] [--length 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import zstandard

from tether.engine.default_model import DEFAULT_MODEL_NAME
from tether.engine.model_loading import load_base_model
from tether.engine.training_engine import TrainingEngine
from tether.engine.training_types import AdamWParams, EngineDatum
from tether.storage.delta import DELTA_FILE, _repeated, compute_delta, write_delta


def unique(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen, out = set(), {}
    for name, t in tensors.items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def delta_bytes(delta, base) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        write_delta(Path(tmp), delta, base)
        return (Path(tmp) / DELTA_FILE).stat().st_size


def plain_bytes(delta, compressor: zstandard.ZstdCompressor) -> int:
    """Plain XOR+zstd: each tensor's XOR with its base compressed on its own."""
    return sum(len(compressor.compress(x.numpy().tobytes())) for x in delta.xor.values())


def entropy_estimate_bytes(start: dict[str, torch.Tensor], now: dict[str, torch.Tensor], lr: float) -> float:
    """Estimated information (bytes) in the move of every float element; see the module docstring."""
    delta = compute_delta(start, now)
    stored = [n for n in delta.xor if n not in _repeated(delta.xor)]
    return _fp32_estimate(start, now, lr, [n for n in stored if start[n].dtype == torch.float32]) + (
        _bf16_estimate(start, now, [n for n in stored if start[n].dtype == torch.bfloat16])
    )


def _bf16_estimate(start: dict[str, torch.Tensor], now: dict[str, torch.Tensor], names: list[str]) -> float:
    """Empirical entropy (bytes) of each element's move in ulps, given its base exponent."""
    if not names:
        return 0.0
    base = torch.cat([start[n].reshape(-1) for n in names]).view(torch.int16).numpy().view(np.uint16)
    new = torch.cat([now[n].reshape(-1) for n in names]).view(torch.int16).numpy().view(np.uint16)
    move = (new.astype(np.int64) - base.astype(np.int64)) % 65536
    _, counts = np.unique((base.astype(np.int64) >> 7) * 65536 + move, return_counts=True)
    _, group = np.unique(base >> 7, return_counts=True)
    return float(((counts * np.log2(counts)).sum() * -1 + (group * np.log2(group)).sum()) / 8)


def _fp32_estimate(
    start: dict[str, torch.Tensor], now: dict[str, torch.Tensor], lr: float, names: list[str]
) -> float:
    if not names:
        return 0.0
    base = torch.cat([start[n].reshape(-1) for n in names])
    moved = (torch.cat([now[n].reshape(-1) for n in names]).double() - base.double()).numpy() / lr
    width = 1 / 16
    _, counts = np.unique(np.floor(moved / width).astype(np.int64), return_counts=True)
    p = counts / counts.sum()
    exponent = ((base.view(torch.int32).numpy().view(np.uint32) >> 23) & 0xFF).astype(np.int64)
    ulp = np.ldexp(1.0, np.maximum(exponent, 1) - 150)
    inside = np.log2(np.maximum(width * lr / ulp, 1.0))
    return float((-(p * np.log2(p)).sum() * moved.size + inside.sum()) / 8)


def batch(step: int, size: int, length: int, vocab: int) -> list[EngineDatum]:
    rng = np.random.default_rng(step)
    text = "the quick brown fox jumps over the lazy dog; tether saves weights for sampling. " * 20
    data = []
    for _ in range(size):
        start = int(rng.integers(0, len(text) - length - 1))
        tokens = torch.tensor([min(ord(c), vocab - 1) for c in text[start : start + length + 1]])
        data.append(EngineDatum(tokens[:-1], {"target_tokens": tokens[1:], "weights": torch.ones(length)}))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-4])
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"]
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()
    ratios = []
    for dtype in args.dtypes:
        ratios += run(dtype, args)
    print(f"tether/plain: min {min(ratios):.2f}, max {max(ratios):.2f} (target >= 1.5)")


def run(dtype: str, args: argparse.Namespace) -> list[float]:
    """Print one table for weights of `dtype`; returns tether/plain per row."""
    base = load_base_model(DEFAULT_MODEL_NAME, dtype=dtype)
    engine = TrainingEngine(base)
    compressor = zstandard.ZstdCompressor(level=3)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"model {DEFAULT_MODEL_NAME} {dtype}, full fine-tuning, AdamW, batch {args.batch}×{args.length} "
        f"tokens; load average {load} on {os.cpu_count()} CPUs"
    )
    print(
        f"{'lr':>7} {'steps':>5} {'full MB':>8} {'changed':>8} {'plain ×':>8} {'tether ×':>9} {'tether/plain':>13} "
        f"{'chained ×':>10} {'chain t/p':>10} {'entropy ×':>10} {'entropy/plain':>14}"
    )
    ratios = []
    for lr in args.lrs:
        model_id = f"bench-{lr}"
        engine.create_model(model_id, lora=None)
        start = unique(engine.sampler_weights(model_id).tensors)
        previous, chained, chained_plain = start, [], []
        done = 0
        for target_steps in sorted(args.steps):
            while done < target_steps:
                engine.forward_backward(
                    model_id, batch(done, args.batch, args.length, base.vocab_size), "cross_entropy"
                )
                engine.optim_step(model_id, AdamWParams(learning_rate=lr))
                done += 1
                current = unique(engine.sampler_weights(model_id).tensors)
                step_delta = compute_delta(previous, current)
                chained.append(delta_bytes(step_delta, previous))
                chained_plain.append(plain_bytes(step_delta, compressor))
                previous = current
            now = unique(engine.sampler_weights(model_id).tensors)
            full = sum(t.numel() * t.element_size() for t in now.values())
            delta = compute_delta(start, now)
            plain = plain_bytes(delta, compressor)
            ours = delta_bytes(delta, start)
            ratios.append(plain / ours)
            estimate = entropy_estimate_bytes(start, now, lr)
            elements = sum(x.numel() for x in delta.xor.values())
            changed = sum(int(x.count_nonzero()) for x in delta.xor.values()) / elements
            print(
                f"{lr:7.0e} {target_steps:5d} {full / 1e6:8.2f} {changed:8.1%} {full / plain:8.2f} {full / ours:9.2f} "
                f"{plain / ours:13.2f} {full / (sum(chained) / len(chained)):10.2f} "
                f"{sum(chained_plain) / sum(chained):10.2f} "
                f"{full / max(estimate, 1):10.2f} {plain / max(estimate, 1):14.2f}",
                flush=True,
            )
        engine.delete_model(model_id)
    return ratios


if __name__ == "__main__":
    main()
