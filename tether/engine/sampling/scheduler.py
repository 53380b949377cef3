"""Which waiting requests join the running batch at the next step: FIFO under a KV-cache budget.

A request reserves, for each of its samples, the KV-cache tokens it may occupy at most (prompt plus
max_tokens), so admitted work can always run to completion and nothing is ever preempted. The
budget counts tokens, not buffer slots: the batch's left-padded KV buffer holds rows x longest-row
slots, so padding between rows of very different lengths comes on top. A request
waits while the reservation would exceed the budget, the batch is full, or this step's prefill
allowance is spent; requests are admitted strictly in arrival order, so a large request is never
starved by a stream of small ones. Past `max_waiting_requests` waiting requests, `add` raises
`OverloadedError`, which the service turns into HTTP 429.

`prefill_batches` then splits the prompts admitted together into batches prefilled in one forward
pass each, padding prompts of different lengths only as far as it pays.

Plain Python: no model, no tensors, no threads (the engine holds the lock); tested with fake work.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from tether.types.errors import ConfigurationError, OverloadedError, UserInputError

T = TypeVar("T")


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of the running batch."""

    kv_cache_budget_tokens: int = 65536
    """KV-cache tokens all running sequences may reserve together (prompt + max_tokens each)."""
    max_batch_size: int = 64
    """Most sequences decoded together in one step."""
    max_prefill_tokens_per_step: int = 4096
    """Prompt tokens prefilled per step beyond the first request, so decoding keeps moving."""
    max_waiting_requests: int = 1024
    """Requests that may wait for admission; one more is refused as overload."""

    def __post_init__(self) -> None:
        for name in (
            "kv_cache_budget_tokens",
            "max_batch_size",
            "max_prefill_tokens_per_step",
            "max_waiting_requests",
        ):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"must be >= 1, got {getattr(self, name)}", field=name)


@dataclass
class WorkCost:
    """What one request needs from the running batch."""

    reserved_tokens: int
    """KV-cache tokens reserved while it runs (all samples)."""
    num_sequences: int
    """Rows it adds to the batch (its samples)."""
    prefill_tokens: int
    """Prompt tokens its prefill processes."""


@dataclass
class _Waiting(Generic[T]):
    item: T
    cost: WorkCost


class Scheduler(Generic[T]):
    """Admission control for the sampling engine's running batch."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._waiting: deque[_Waiting[T]] = deque()
        self.reserved_tokens = 0
        self.running_sequences = 0

    @property
    def queue_depth(self) -> int:
        """Requests waiting for admission."""
        return len(self._waiting)

    @property
    def has_waiting(self) -> bool:
        return bool(self._waiting)

    def check_fits(self, cost: WorkCost) -> None:
        """Refuse work that could never be admitted, even into an empty batch."""
        if cost.reserved_tokens > self.config.kv_cache_budget_tokens:
            raise UserInputError(
                f"num_samples x (prompt + max_tokens) = {cost.reserved_tokens} tokens exceeds the sampler's"
                f" KV-cache budget of {self.config.kv_cache_budget_tokens} tokens",
                field="max_tokens",
            )
        if cost.num_sequences > self.config.max_batch_size:
            raise UserInputError(
                f"{cost.num_sequences} samples exceed the sampler's batch size {self.config.max_batch_size}",
                field="num_samples",
            )

    def add(self, item: T, cost: WorkCost) -> None:
        """Queue `item`; raise `UserInputError` if it can never run, `OverloadedError` if the queue is full."""
        self.check_fits(cost)
        if len(self._waiting) >= self.config.max_waiting_requests:
            raise OverloadedError(
                f"the sampler has {len(self._waiting)} requests waiting (limit {self.config.max_waiting_requests});"
                " retry later"
            )
        self._waiting.append(_Waiting(item, cost))

    def schedule(self) -> list[T]:
        """Admit waiting requests in arrival order while they fit; reserve their resources."""
        admitted: list[T] = []
        prefill_tokens = 0
        while self._waiting:
            head = self._waiting[0]
            cost = head.cost
            if self.reserved_tokens + cost.reserved_tokens > self.config.kv_cache_budget_tokens:
                break
            if self.running_sequences + cost.num_sequences > self.config.max_batch_size:
                break
            if admitted and prefill_tokens + cost.prefill_tokens > self.config.max_prefill_tokens_per_step:
                break
            self._waiting.popleft()
            self.reserved_tokens += cost.reserved_tokens
            self.running_sequences += cost.num_sequences
            prefill_tokens += cost.prefill_tokens
            admitted.append(head.item)
        return admitted

    def remove_where(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take the waiting requests for which `predicate` holds out of the queue (cancelled ones);
        they had reserved nothing. Returns them in arrival order."""
        kept: deque[_Waiting[T]] = deque()
        removed = []
        for waiting in self._waiting:  # one look per item: the predicate may change its mind
            if predicate(waiting.item):
                removed.append(waiting.item)
            else:
                kept.append(waiting)
        self._waiting = kept
        return removed

    def release(self, reserved_tokens: int, num_sequences: int) -> None:
        """Give back what finished sequences had reserved."""
        self.reserved_tokens -= reserved_tokens
        self.running_sequences -= num_sequences
        if self.reserved_tokens < 0 or self.running_sequences < 0:
            raise AssertionError("released more than was reserved")

    def drain(self) -> list[T]:
        """Remove and return every waiting request (engine shutdown)."""
        items = [w.item for w in self._waiting]
        self._waiting.clear()
        return items


DEFAULT_PREFILL_FORWARD_COST_TOKENS = 64.0
"""What one more prefill forward pass costs, in prompt tokens. About 64 on a CPU with the tiny default
model (one forward pass of n tokens took ~20 ms + 0.3 ms x n; `bench/sampling_throughput.py
--baseline one-at-a-time`). GPUs pay far more per pass relative to a token: larger values suit them."""


def prefill_batches(lengths: Sequence[int], forward_cost_tokens: float) -> list[list[int]]:
    """Group prompts (by index into `lengths`) into batches prefilled together, at least cost.

    A batch left-pads its prompts to its longest, so it costs `forward_cost_tokens + rows x longest`
    (a padded position costs as much as a real one): prompts are padded only as far as the padding
    costs less than the forward passes it saves. Equal lengths always share a batch; 0 batches
    nothing else, `inf` everything. Batches come longest first, each longest first. O(n^2) in the
    number of prompts (bounded by the batch size).
    """
    if not forward_cost_tokens >= 0:
        raise ValueError(f"forward_cost_tokens must be >= 0, got {forward_cost_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    longest = [lengths[i] for i in order]
    # best[end]: least cost of batching order[:end]; start[end]: where its last batch starts.
    best = [0.0] + [math.inf] * len(order)
    start = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for first in range(end):  # batch order[first:end]; its longest prompt is order[first]
            if math.isinf(forward_cost_tokens) and first > 0:
                break
            cost = best[first] + forward_cost_tokens + (end - first) * longest[first]
            if cost < best[end]:
                best[end], start[end] = cost, first
    batches: list[list[int]] = []
    end = len(order)
    while end:
        batches.append(order[start[end] : end])
        end = start[end]
    return batches[::-1]
