"""Forward passes of the sampling engine: prefill one prompt, decode one token for many sequences.

Both drive a Hugging Face causal LM with a `BatchKVCache`, an explicit 4-D boolean attention mask
and explicit position ids, so rows of different lengths (left-padded) decode together exactly as
each would alone. Adapters are routed per row with `AdapterRouting.for_rows` inside this thread's
`adapter_routing`, so a trainer thread may run the same base module at the same time.

Models with sliding-window layers get one mask per layer type, as `generate` passes them.

This module knows nothing about requests, stops or scheduling.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tether.engine.lora import AdapterRouting, adapter_routing
from tether.engine.sampling.kv_cache import BatchKVCache
from tether.engine.sampling.next_token import untempered_logprobs
from tether.types.errors import ServerError


@dataclass
class PrefillOutput:
    """The prompt's cache (one row) and what was computed from its logits."""

    cache: BatchKVCache
    last_logits: torch.Tensor
    """(vocab,) float32 logits after the last prompt token: the first generated token's distribution."""
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cache_argument(model: nn.Module) -> str:
    """The keyword the model's forward takes its cache under: `cache` in recent transformers,
    `past_key_values` before (an unknown keyword would be swallowed by `**kwargs` and the model would
    silently build a cache of its own)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _run(model: nn.Module, cache: BatchKVCache, input_ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    device = input_ids.device
    num_new = input_ids.shape[1]
    try:
        output = model(
            input_ids=input_ids,
            attention_mask=_masks_for(model, cache, num_new, device),
            position_ids=cache.position_ids(num_new, device),
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{_cache_argument(model): cache},
        )
    except BaseException:
        cache.discard()
        raise
    if not cache.keys:
        cache.discard()
        raise ServerError(
            f"{type(model).__name__} did not write into the KV cache it was given; "
            "this transformers version or model is not supported by the sampling engine"
        )
    cache.commit()
    return output.logits


def _masks_for(
    model: nn.Module, cache: BatchKVCache, num_new: int, device: torch.device
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The attention mask argument: one 4-D mask, or one per layer type for sliding-window models.

    Models with sliding-window layers take a mapping from layer type to mask (the form `generate`
    prepares); the cache keeps every token, and the sliding mask hides those outside the window.
    """
    full = _mask_for(model, cache.attention_mask(num_new, device))
    config: Any = model.config  # a transformers PretrainedConfig
    if "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
        return full
    window = cache.attention_mask(num_new, device, sliding_window=config.sliding_window)
    return {"full_attention": full, "sliding_attention": _mask_for(model, window)}


def _mask_for(model: nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """The 4-D mask in the form the model's attention takes: boolean for SDPA, additive otherwise.

    Hugging Face passes a prepared 4-D mask through untouched, and its eager attention adds it to
    the scores, so there a boolean mask would silently attend everywhere.
    """
    if getattr(model.config, "_attn_implementation", "sdpa") == "sdpa":
        return allowed
    dtype = next(model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


@torch.inference_mode()
def prefill(
    model: nn.Module,
    adapter_id: str | None,
    prompt_tokens: Sequence[int],
    *,
    include_prompt_logprobs: bool = False,
    topk_prompt_logprobs: int = 0,
) -> PrefillOutput:
    """Run the prompt through `model` (with adapter `adapter_id`) into a fresh one-row cache."""
    device = model_device(model)
    cache = BatchKVCache()
    cache.start_rows(1)
    input_ids = torch.tensor([list(prompt_tokens)], dtype=torch.long, device=device)
    want_all = include_prompt_logprobs or topk_prompt_logprobs > 0
    with adapter_routing(adapter_id):
        logits = _run(model, cache, input_ids, 0 if want_all else 1)[0].float()
    output = PrefillOutput(cache=cache, last_logits=logits[-1])
    if want_all and len(prompt_tokens) > 1:
        logprobs = untempered_logprobs(logits[:-1])
        if include_prompt_logprobs:
            picked = logprobs.gather(1, input_ids[0, 1:, None]).squeeze(1)
            output.prompt_logprobs = [None, *picked.tolist()]
        if topk_prompt_logprobs > 0:
            values, ids = logprobs.topk(topk_prompt_logprobs, dim=-1)
            rows = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
            output.topk_prompt_logprobs = [None, *rows]
    elif want_all:
        output.prompt_logprobs = [None] if include_prompt_logprobs else None
        output.topk_prompt_logprobs = [None] if topk_prompt_logprobs > 0 else None
    return output


@torch.inference_mode()
def decode(
    model: nn.Module, cache: BatchKVCache, tokens: Sequence[int], adapter_ids: Sequence[str | None]
) -> torch.Tensor:
    """Feed one token per cache row; return (rows, vocab) float32 logits of the next token."""
    device = model_device(model)
    input_ids = torch.tensor(list(tokens), dtype=torch.long, device=device)[:, None]
    if any(a is not None for a in adapter_ids):
        routing: AdapterRouting | None = AdapterRouting.for_rows(adapter_ids, seq_len=1, device=device)
    else:
        routing = None
    with adapter_routing(routing):
        logits = _run(model, cache, input_ids, 1)
    return logits[:, -1].float()
