"""Recently prefilled prompts, reused when the same prompt comes again for the same weights.

RL loops send a group of G identical prompts as G separate requests at nearly the same time; with
this cache only the first is prefilled and the others start decoding from a copy of its KV cache
(`BatchKVCache.append_rows` copies, so a cached entry is never modified). Matching is by the exact
prompt, the weights registration (an object held by the key, so a re-registered snapshot never
matches an old entry) and the prompt-logprob options (the outputs differ). Bounded by prompt tokens,
least recently used first out.

This module knows nothing about models or scheduling.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class PromptCache(Generic[V]):
    """An LRU map from a prompt key to its prefill, holding at most `max_tokens` prompt tokens."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.num_tokens = 0
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, value: V, num_tokens: int) -> None:
        """Remember `value`; entries larger than the whole cache are not kept."""
        if num_tokens > self.max_tokens:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.num_tokens -= old[1]
        self._entries[key] = (value, num_tokens)
        self.num_tokens += num_tokens
        while self.num_tokens > self.max_tokens:
            _, (_, evicted_tokens) = self._entries.popitem(last=False)
            self.num_tokens -= evicted_tokens

    def evict_where(self, predicate: Callable[[Hashable], bool]) -> None:
        for key in [k for k in self._entries if predicate(k)]:
            self.num_tokens -= self._entries.pop(key)[1]

    def clear(self) -> None:
        self._entries.clear()
        self.num_tokens = 0
