"""Stability records: what `asample` keeps about sequences sampled with `record_stability_info=true`.

For each such request the server keeps its prompt, and per sequence the sampled tokens and the
sampler's logprobs, under the request id; a sequence's id is `<request_id>:<index>` (what asample
answers as `sample_sequence_ids`). A `stable_reinforce` training request reads them back through its
datums' provenance spans (`tether.types.provenance`).

Records belong to the owner and session that sampled them; another session's lookup finds nothing.
They expire `ttl_s` after they were last used (sampled or trained on; a day by default, as the
hosted service documents), and the store holds at most `max_tokens` tokens in all, dropping the
least recently used request first, so its memory is bounded over any run. Thread-safe.

Knows nothing about HTTP, models or losses.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tether.types.provenance import SequenceRecord

__all__ = ["StabilityRecords"]

DEFAULT_TTL_S = 86_400.0
DEFAULT_MAX_TOKENS = 1 << 24
"""16 Mi tokens: about 200 MB of prompts, tokens and logprobs at most."""


@dataclass
class _Request:
    owner: str
    session_id: str
    sequences: list[SequenceRecord]
    tokens: int
    last_used: float


class StabilityRecords:
    """Sampled sequences kept for stable_reinforce, keyed by request id, LRU with a token budget."""

    def __init__(
        self,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_tokens = max_tokens
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: OrderedDict[str, _Request] = OrderedDict()
        self._tokens = 0

    def record(
        self,
        request_id: str,
        *,
        owner: str,
        session_id: str,
        prompt: Sequence[int],
        sequences: Sequence[tuple[Sequence[int], Sequence[float]]],
    ) -> None:
        """Keep `request_id`'s prompt and its (sampled tokens, logprobs) pairs, in sequence order."""
        prompt_array = np.asarray(prompt, dtype=np.int64)
        kept = [
            SequenceRecord(
                prompt=prompt_array,
                tokens=np.asarray(tokens, dtype=np.int64),
                logprobs=np.asarray(logprobs, dtype=np.float32),
            )
            for tokens, logprobs in sequences
        ]
        size = prompt_array.shape[0] + sum(r.tokens.shape[0] for r in kept)
        with self._lock:
            now = self._clock()
            self._drop(request_id)
            self._requests[request_id] = _Request(owner, session_id, kept, size, now)
            self._tokens += size
            self._evict(now)

    def lookup(self, owner: str, session_id: str) -> Callable[[str], SequenceRecord | None]:
        """A lookup of `<request_id>:<index>` ids for one session; a hit refreshes its request's ttl."""

        def find(sequence_id: str) -> SequenceRecord | None:
            request_id, _, index = sequence_id.rpartition(":")
            if not index.isdigit():
                return None
            with self._lock:
                now = self._clock()
                self._evict(now)
                entry = self._requests.get(request_id)
                if entry is None or entry.owner != owner or entry.session_id != session_id:
                    return None
                if int(index) >= len(entry.sequences):
                    return None
                entry.last_used = now
                self._requests.move_to_end(request_id)
                return entry.sequences[int(index)]

        return find

    def forget_session(self, session_id: str) -> None:
        """Drop every record of `session_id` (the session ended)."""
        with self._lock:
            for request_id in [k for k, v in self._requests.items() if v.session_id == session_id]:
                self._drop(request_id)

    @property
    def tokens(self) -> int:
        with self._lock:
            return self._tokens

    def __len__(self) -> int:
        with self._lock:
            return len(self._requests)

    def _drop(self, request_id: str) -> None:
        entry = self._requests.pop(request_id, None)
        if entry is not None:
            self._tokens -= entry.tokens

    def _evict(self, now: float) -> None:
        while self._requests:
            request_id, oldest = next(iter(self._requests.items()))
            if self._tokens <= self.max_tokens and now - oldest.last_used <= self.ttl_s:
                break
            self._drop(request_id)
