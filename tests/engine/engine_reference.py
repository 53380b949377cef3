"""Plain-PyTorch reference for the training engine's tests: HF model, explicit log-softmax + gather,
LoRA as forward hooks, and every loss formula written out once more, independently of tether."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM

from tether.engine.training_types import EngineDatum


def plain_model(path):
    """The unwrapped HF model in fp32 eval mode, all parameters trainable."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.requires_grad_(True)
    return model


def add_lora_hooks(model, tensors: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Leaf copies of the LoRA factors, applied as out += scale * (x A^T) B^T on each adapted Linear."""
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in tensors.items()}
    model.requires_grad_(False)
    for name in tensors:
        if not name.endswith(".lora_A"):
            continue
        path = name[: -len(".lora_A")]
        a, b = leaves[f"{path}.lora_A"], leaves[f"{path}.lora_B"]

        def hook(module, inputs, output, a=a, b=b):
            return output + scale * (inputs[0] @ a.T) @ b.T

        model.get_submodule(path).register_forward_hook(hook)
    return leaves


def reference_logprobs(model, datum: EngineDatum) -> torch.Tensor:
    logits = model(datum.input_tokens[None]).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    targets = datum.loss_fn_inputs["target_tokens"]
    return logp.gather(-1, targets.reshape(targets.shape[0], -1)).reshape(targets.shape)


def reference_loss(loss_fn: str, lp: torch.Tensor, inputs: dict, config: dict) -> torch.Tensor:
    if loss_fn == "cross_entropy":
        return (-lp * inputs["weights"]).sum()
    q, adv = inputs["logprobs"], inputs["advantages"]
    ratio = torch.exp(lp - q)
    if loss_fn == "importance_sampling":
        return -(ratio * adv).sum()
    low, high = config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2)
    if loss_fn == "ppo":
        return -torch.min(ratio * adv, ratio.clamp(low, high) * adv).sum()
    if loss_fn == "cispo":
        return -(ratio.clamp(low, high).detach() * lp * adv).sum()
    if loss_fn == "dro":
        return -(lp * adv - 0.5 * config["beta"] * (lp - q) ** 2).sum()
    if loss_fn == "reinforce":
        return -(lp * adv).sum()
    if loss_fn == "gspo":
        return reference_gspo(lp, q, adv, inputs.get("sequence_ratio_mask"), config)
    if loss_fn == "stable_reinforce":
        mask, cap, kl = inputs["sampled_mask"], config.get("ratio_cap", 2.0), config.get("kl_coeff", 0.0)
        pg = -(mask * torch.clamp(ratio, max=cap).detach() * adv * lp).sum()
        return pg + kl * (mask * (ratio - 1 - torch.log(ratio))).sum()
    raise ValueError(loss_fn)


def reference_gspo(lp, q, adv, mask, config) -> torch.Tensor:
    """Token by token: each token's ratio is the sequence's, with its gradient through that token only."""
    if mask is None:
        mask = (adv != 0).float()
    low, high = config.get("clip_low_threshold", 1 - 3e-4), config.get("clip_high_threshold", 1 + 4e-4)
    count = float(mask.sum())
    mean_log_ratio = float((mask * (lp - q)).detach().sum()) / count if count > 0 else 0.0
    total = torch.zeros(())
    for t in range(lp.shape[0]):
        if float(mask[t]) == 0.0:
            continue
        s_t = math.exp(mean_log_ratio) * torch.exp(lp[t] - float(lp[t].detach()))
        clipped = torch.clamp(s_t, low, high)
        total = total - mask[t] * torch.min(s_t * adv[t], clipped * adv[t])
    return total


def make_data(lengths, *, vocab: int, seed: int = 0, soft_k: int | None = None) -> list[EngineDatum]:
    """Random datums with every loss input; logprobs near the model's so PPO/CISPO clip some tokens."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for n in lengths:
        tokens = torch.randint(0, vocab, (n,), generator=gen)
        shape = (n,) if soft_k is None else (n, soft_k)
        targets = torch.randint(0, vocab, shape, generator=gen)
        data.append(
            EngineDatum(
                input_tokens=tokens,
                loss_fn_inputs={
                    "target_tokens": targets,
                    "weights": torch.randn(shape, generator=gen),
                    "logprobs": -torch.log(torch.tensor(float(vocab)))
                    + 0.4 * torch.randn(shape, generator=gen),
                    "advantages": torch.randn(shape, generator=gen),
                    "sampled_mask": (torch.rand(shape, generator=gen) > 0.3).float(),
                },
            )
        )
    return data
