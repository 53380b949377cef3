"""The sampling engine's bookkeeping: a request's state, its running samples, the groups decoded
together, and the engine's stats. Data only: the engine (`engine.py`) drives them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from tether.engine.sampling.kv_cache import BatchKVCache
from tether.engine.sampling.next_token import RowSampling
from tether.engine.sampling.stopping import StopCondition
from tether.engine.sampling.weights import RegisteredWeights
from tether.types.sample_request import SampledSequence, SampleResult, ValidatedRequest

TokenCallback = Callable[[int, int, float, "list[tuple[int, float]] | None"], None]
"""`on_token(sample_index, token, logprob, topk)`: one generated token, in order per sample; `topk` is
the (token, logprob) pairs when the request asked for `topk_sample_logprobs`, else None."""


def holds_retired_weights(key: Hashable) -> bool:
    """Whether a prompt-cache key (built by `prefill_key`) holds unregistered, unused weights."""
    weights = cast("tuple[RegisteredWeights, ...]", key)[0]
    return weights.retired and weights.users == 0


@dataclass(eq=False)
class RequestState:
    """One submitted request: what it asked, its future, and its samples' progress."""

    request: ValidatedRequest
    future: Future[SampleResult]
    weights: RegisteredWeights
    stop: StopCondition
    on_token: TokenCallback | None = None
    sequences: list[SampledSequence | None] = field(init=False)
    """Finished samples by index."""
    unfinished: int = field(init=False)
    """Samples not finished yet; each holds a batch row and its KV reservation once admitted."""
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    prompt_cache_hit_tokens: int = 0
    settled: bool = False
    """Its outcome (result, failure or cancellation) was counted; nothing more happens to it."""

    def __post_init__(self) -> None:
        self.sequences = [None] * self.request.num_samples
        self.unfinished = self.request.num_samples


@dataclass(eq=False)
class RunningSequence:
    """One sample being generated: its tokens so far and its own random generator."""

    owner: RequestState
    index: int
    generator: torch.Generator
    row: RowSampling
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass(eq=False)
class Started:
    """A request's samples still running after their first token, and their prompt's cache row."""

    cache: BatchKVCache
    row: int
    sequences: list[RunningSequence]


def prefill_key(state: RequestState) -> Hashable:
    """What makes two prefills the same: weights registration, prompt, prompt-logprob options."""
    request = state.request
    return (
        state.weights,
        request.prompt_tokens,
        request.include_prompt_logprobs,
        request.topk_prompt_logprobs,
    )


@dataclass(eq=False)
class DecodeGroup:
    """Running sequences that share one model, decoded together with one KV cache."""

    model: nn.Module
    cache: BatchKVCache = field(default_factory=BatchKVCache)
    sequences: list[RunningSequence] = field(default_factory=list)


@dataclass(frozen=True)
class EngineStats:
    """What the engine holds now, and how its requests ended so far (see `SamplingEngine.stats`)."""

    waiting_requests: int
    """Requests queued for admission."""
    running_sequences: int
    """Samples admitted and not finished: each holds a batch row and KV-cache rows."""
    reserved_tokens: int
    """KV-cache tokens reserved by the running samples (out of `kv_cache_budget_tokens`)."""
    completed: int
    """Requests that ended with a result."""
    failed: int
    """Requests that ended with an error."""
    cancelled: int
    """Requests cancelled by their caller and dropped by the engine (their resources released)."""
