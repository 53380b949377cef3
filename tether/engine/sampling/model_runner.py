"""Forward passes of the sampling engine: prefill a batch of prompts, decode one token for many sequences.

A batched prefill left-pads prompts of different lengths to the longest (padding attends only to
itself, real tokens never see it, positions count from each prompt's first real token), so each
row's keys, values and logits are those of its prompt run alone. Both drive a Hugging Face causal LM with a `BatchKVCache`, an explicit 4-D boolean attention mask
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

PAD_TOKEN_ID = 0
"""Fed at padding positions of a batched prefill; any valid id does (nothing real attends to it)."""


@dataclass(frozen=True)
class PrefillPrompt:
    """One prompt of a batched prefill."""

    tokens: Sequence[int]
    adapter_id: str | None = None
    include_prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0

    @property
    def wants_all_logits(self) -> bool:
        return self.include_prompt_logprobs or self.topk_prompt_logprobs > 0


@dataclass
class PrefillOutput:
    """The prompt's row `row` of `cache` (shared by the prompts prefilled with it) and what was
    computed from its logits."""

    cache: BatchKVCache
    last_logits: torch.Tensor
    """(vocab,) float32 logits after the last prompt token: the first generated token's distribution."""
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    row: int = 0

    def detached(self) -> PrefillOutput:
        """The same prefill on a one-row cache of its own (frees the batch's buffers for reuse)."""
        if self.cache.num_rows == 1:
            return self
        return PrefillOutput(
            self.cache.copy_row(self.row), self.last_logits, self.prompt_logprobs, self.topk_prompt_logprobs
        )


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


def prefill(
    model: nn.Module,
    adapter_id: str | None,
    prompt_tokens: Sequence[int],
    *,
    include_prompt_logprobs: bool = False,
    topk_prompt_logprobs: int = 0,
) -> PrefillOutput:
    """Run one prompt through `model` (with adapter `adapter_id`) into a fresh one-row cache."""
    prompt = PrefillPrompt(prompt_tokens, adapter_id, include_prompt_logprobs, topk_prompt_logprobs)
    return prefill_batch(model, [prompt])[0]


@torch.inference_mode()
def prefill_batch(model: nn.Module, prompts: Sequence[PrefillPrompt]) -> list[PrefillOutput]:
    """Run `prompts` (any lengths >= 1, any adapters of `model`) through `model` in one forward pass.

    Returns one output per prompt, in order, all on one fresh cache with prompt i in row i
    (left-padded to the longest prompt). Logits of every position are computed for all rows if any
    prompt wants prompt logprobs, so callers batch those apart. Raises what the forward raises.
    """
    if not prompts:
        return []
    device = model_device(model)
    lengths = [len(p.tokens) for p in prompts]
    longest = max(lengths)
    padding = [longest - n for n in lengths]
    input_ids = torch.tensor(
        [[PAD_TOKEN_ID] * pad + list(p.tokens) for p, pad in zip(prompts, padding, strict=True)],
        dtype=torch.long,
        device=device,
    )
    cache = BatchKVCache()
    cache.start_rows(len(prompts), padding)
    want_all = any(p.wants_all_logits for p in prompts)
    with adapter_routing(_routing([p.adapter_id for p in prompts], device)):
        logits = _run(model, cache, input_ids, 0 if want_all else 1)
    outputs = []
    for row, (prompt, pad) in enumerate(zip(prompts, padding, strict=True)):
        row_logits = logits[row, pad:].float() if want_all else logits[row].float()
        output = PrefillOutput(cache=cache, last_logits=row_logits[-1].clone(), row=row)
        if prompt.wants_all_logits:
            _add_prompt_logprobs(output, prompt, row_logits, input_ids[row, pad:])
        outputs.append(output)
    return outputs


def _add_prompt_logprobs(
    output: PrefillOutput, prompt: PrefillPrompt, logits: torch.Tensor, input_ids: torch.Tensor
) -> None:
    """Fill the prompt logprobs `prompt` asks for from its (prompt length, vocab) float32 logits."""
    if len(prompt.tokens) == 1:
        output.prompt_logprobs = [None] if prompt.include_prompt_logprobs else None
        output.topk_prompt_logprobs = [None] if prompt.topk_prompt_logprobs > 0 else None
        return
    logprobs = untempered_logprobs(logits[:-1])
    if prompt.include_prompt_logprobs:
        picked = logprobs.gather(1, input_ids[1:, None]).squeeze(1)
        output.prompt_logprobs = [None, *picked.tolist()]
    if prompt.topk_prompt_logprobs > 0:
        values, ids = logprobs.topk(prompt.topk_prompt_logprobs, dim=-1)
        rows = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        output.topk_prompt_logprobs = [None, *rows]


def _routing(adapter_ids: Sequence[str | None], device: torch.device) -> AdapterRouting | str | None:
    """One adapter for the whole batch when all rows share it, else routing by batch row (the
    output layer sees fewer positions than the others when only the last logits are kept)."""
    if all(a == adapter_ids[0] for a in adapter_ids):
        return adapter_ids[0]
    return AdapterRouting.by_batch_row(adapter_ids, device=device)


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
