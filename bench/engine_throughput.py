"""Training throughput of the engine versus a hand-written PyTorch loop, run side by side.

Both sides train the same Hugging Face model on the same batch with the same AdamW: the plain loop
calls the model, takes a weighted cross entropy and steps `torch.optim.AdamW`; the engine runs
`forward_backward` + `optim_step` through validation, micro-batching and its loss code. Steps are
interleaved (engine, plain, engine, ...) so load on the machine affects both alike, and the median
step time is compared. The ratio engine/plain tokens per second should be at least 0.95.

    python bench/engine_throughput.py                 # default model, LoRA and full fine-tuning
    python bench/engine_throughput.py --mode lora --batch 16 --seq-len 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from tether.engine.default_model import DEFAULT_MODEL_NAME
from tether.engine.lora import LoraSpec
from tether.engine.model_loading import load_base_model
from tether.engine.training_engine import AdamWParams, EngineDatum, TrainingEngine

ADAM = AdamWParams(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-12)


class PlainLoraLinear(nn.Module):
    """The textbook LoRA layer: base(x) + scale * (x A^T) B^T, with fp32 factors on any base dtype."""

    def __init__(self, base: nn.Linear, rank: int, scale: float) -> None:
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features**0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + ((x.float() @ self.lora_A.T) @ self.lora_B.T * self.scale).to(x.dtype)


def plain_lora(model: nn.Module, rank: int, scale: float) -> list[nn.Parameter]:
    model.requires_grad_(False)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and (("attn" in name or "mlp" in name) or module is model.get_output_embeddings())
    ]
    params = []
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        wrapper = PlainLoraLinear(module, rank, scale)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
        params += [wrapper.lora_A, wrapper.lora_B]
    return params


class PlainLoop:
    """Hand-written training step on a plain HF model."""

    def __init__(self, path, mode: str, rank: int, alpha: float, device: str, dtype: str) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        params = (
            plain_lora(self.model, rank, alpha / rank) if mode == "lora" else list(self.model.parameters())
        )
        self.model.to(device)
        self.optimizer = torch.optim.AdamW(
            params,
            lr=ADAM.learning_rate,
            betas=(ADAM.beta1, ADAM.beta2),
            eps=ADAM.eps,
            weight_decay=0.0,
            foreach=True,
        )

    def step(self, tokens: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> float:
        device = next(self.model.parameters()).device
        tokens, targets, weights = tokens.to(device), targets.to(device), weights.to(device)
        logits = self.model(input_ids=tokens, use_cache=False).logits
        losses = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none"
        )
        loss = (losses * weights.reshape(-1)).sum()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def run(mode: str, base, batch: int, seq_len: int, steps: int, rank: int, device: str, dtype: str) -> float:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, base.vocab_size, (batch, seq_len), generator=gen)
    targets = torch.randint(0, base.vocab_size, (batch, seq_len), generator=gen)
    weights = torch.ones(batch, seq_len)
    data = [
        EngineDatum(tokens[i], {"target_tokens": targets[i], "weights": weights[i]}) for i in range(batch)
    ]
    engine = TrainingEngine(base, max_tokens_per_micro_batch=batch * seq_len)
    alpha = 32.0
    engine.create_model("bench", lora=LoraSpec(rank=rank, alpha=alpha, seed=0) if mode == "lora" else None)
    plain = PlainLoop(base.path, mode, rank, alpha, device, dtype)

    def engine_step() -> None:
        engine.forward_backward("bench", data, "cross_entropy")
        engine.optim_step("bench", ADAM)

    def plain_step() -> None:
        plain.step(tokens, targets, weights)

    engine_step(), plain_step()  # warm-up: allocator, optimizer state
    engine_times, plain_times = [], []
    for i in range(steps):
        for fn, times in ((engine_step, engine_times), (plain_step, plain_times))[:: 1 if i % 2 == 0 else -1]:
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
    engine.delete_model("bench")
    num_tokens = batch * seq_len
    engine_tps = num_tokens / statistics.median(engine_times)
    plain_tps = num_tokens / statistics.median(plain_times)
    ratio = engine_tps / plain_tps
    print(
        f"{mode:>4} on {device} ({dtype}): engine {engine_tps:9.0f} tok/s   plain PyTorch {plain_tps:9.0f} tok/s   "
        f"ratio {ratio:.3f}   ({steps} steps of {batch}x{seq_len} tokens, median)"
    )
    return ratio


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=DEFAULT_MODEL_NAME, help="model name, local HF directory or hub id"
    )
    parser.add_argument("--mode", choices=["lora", "full", "both"], default="both")
    parser.add_argument("--batch", type=int, default=4, help="datums per step")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per datum")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="base weights' dtype"
    )
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = load_base_model(args.model, device=args.device, dtype=args.dtype)
    for mode in ("lora", "full") if args.mode == "both" else (args.mode,):
        run(mode, base, args.batch, args.seq_len, args.steps, args.rank, args.device, args.dtype)


if __name__ == "__main__":
    main()
