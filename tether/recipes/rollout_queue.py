"""Rollout groups sampled in the background on the latest published weights, with bounded staleness.

`AsyncRollouts` keeps sampling groups (prompt number `index`, `group_size` answers each) while the
trainer trains. Every group remembers the `version` of the weights it was sampled with (the number
of optimizer steps in them); trained at step `s`, its staleness is `s - version`. With bound K
(`max_steps_off_policy`) and B groups per step:

- A group starts only when the step it is expected to be trained at, floor((groups trained +
  groups started and not yet taken) / B), is at most `version + K`: sampling runs up to K steps ahead of the trainer and then waits for
  newer weights (K = 0 is synchronous on-policy RL).
- `policy="wait"`: the trainer takes groups in the order they were started, waiting for a slow one,
  so no group is ever trained more than K steps off-policy (a restored group that is, because a
  resumed run lowered K, is dropped).
- `policy="drop"`: the trainer takes groups in the order they finish, so a slow group never holds
  training up; one that finishes after its staleness passed K is dropped (and counted).

`snapshot()` waits for the groups in flight and returns every finished, untrained group with the
counters, as JSON; a queue built from it (`restore`) trains those groups without sampling them
again, so a resumed run loses none. Sampling runs in a thread pool whose tasks block on the SDK's
futures, so any client with `sample(...).result()` works. This module knows nothing of losses.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Literal

from tether.types.errors import UserInputError

StalePolicy = Literal["wait", "drop"]


@dataclass
class Sample:
    """One sampled answer: its tokens, the sampler's logprob of each, and its reward."""

    tokens: list[int]
    logprobs: list[float]
    reward: float


@dataclass
class RolloutGroup:
    """The answers sampled for prompt number `index` with weights of `version` optimizer steps."""

    index: int
    version: int
    prompt_tokens: list[int]
    samples: list[Sample]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> RolloutGroup:
        samples = [
            Sample([int(t) for t in s["tokens"]], [float(x) for x in s["logprobs"]], float(s["reward"]))
            for s in row["samples"]
        ]
        return cls(int(row["index"]), int(row["version"]), [int(t) for t in row["prompt_tokens"]], samples)


# sample_group(sampling_client, index, version) -> RolloutGroup, blocking; run in the pool.
SampleGroupFn = Callable[[Any, int, int], RolloutGroup]


class AsyncRollouts:
    """The background sampler and its buffer; every method is thread-safe."""

    def __init__(
        self,
        sample_group: SampleGroupFn,
        *,
        batch_size: int,
        max_steps_off_policy: int,
        policy: StalePolicy = "wait",
        state: dict[str, Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise UserInputError(f"must be >= 1, got {batch_size}", field="batch_size")
        if max_steps_off_policy < 0:
            raise UserInputError(f"must be >= 0, got {max_steps_off_policy}", field="max_steps_off_policy")
        if policy not in ("wait", "drop"):
            raise UserInputError(f"must be 'wait' or 'drop', got {policy!r}", field="stale_groups")
        self._sample_group = sample_group
        self.batch_size = batch_size
        self.max_steps_off_policy = max_steps_off_policy
        self.policy = policy
        self._cond = threading.Condition()
        self._client: Any = None
        self._version = -1
        self._next_index = int((state or {}).get("next_index", 0))
        self._trained = int((state or {}).get("trained", 0))
        self._completed: dict[int, RolloutGroup] = {}
        for row in (state or {}).get("groups", []):
            group = RolloutGroup.from_json(row)
            self._completed[group.index] = group
        self._in_flight: set[int] = set()
        self._error: BaseException | None = None
        self._pool = ThreadPoolExecutor(
            max_workers=min(64, batch_size * (max_steps_off_policy + 1)), thread_name_prefix="tether-rollout"
        )
        self._closed = False

    # ---- the trainer's side

    def publish(self, sampling_client: Any, version: int) -> None:
        """New weights (`version` optimizer steps): groups started from now on sample with them."""
        with self._cond:
            self._client, self._version = sampling_client, version
            self._pump()

    def take_batch(self, step: int) -> tuple[list[RolloutGroup], int]:
        """`batch_size` groups to train at `step`, and how many stale groups were dropped meanwhile."""
        groups: list[RolloutGroup] = []
        dropped = 0
        with self._cond:
            while len(groups) < self.batch_size:
                group = self._wait_for_next()
                if step - group.version > self.max_steps_off_policy:
                    # Under "wait" only a restored group can be this stale (the bound was lowered).
                    dropped += 1
                else:
                    groups.append(group)
                    self._trained += 1
                self._pump()
        return groups, dropped

    def snapshot(self) -> dict[str, Any]:
        """Counters and every finished, untrained group (JSON-able), after the groups in flight finish."""
        with self._cond:
            while self._in_flight and self._error is None:
                self._cond.wait()
            self._raise_error()
            return {
                "next_index": self._next_index,
                "trained": self._trained,
                "groups": [self._completed[i].to_json() for i in sorted(self._completed)],
            }

    def stats(self) -> dict[str, float]:
        with self._cond:
            return {
                "async/in_flight_groups": float(len(self._in_flight)),
                "async/buffered_groups": float(len(self._completed)),
            }

    def close(self) -> None:
        with self._cond:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- inside (the lock is held)

    def _outstanding(self) -> int:
        return len(self._in_flight) + len(self._completed)

    def _pump(self) -> None:
        """Start every group the staleness bound allows on the current weights."""
        if self._client is None or self._closed:
            return
        while (
            self._trained + self._outstanding()
        ) // self.batch_size - self.max_steps_off_policy <= self._version:
            index = self._next_index
            self._next_index += 1
            self._in_flight.add(index)
            future = self._pool.submit(self._sample_group, self._client, index, self._version)
            future.add_done_callback(functools.partial(self._finished, index))

    def _finished(self, index: int, future: Future) -> None:
        with self._cond:
            self._in_flight.discard(index)
            if future.cancelled():
                pass
            elif future.exception() is not None:
                self._error = self._error or future.exception()
            else:
                self._completed[index] = future.result()
            self._cond.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _wait_for_next(self) -> RolloutGroup:
        while True:
            self._raise_error()
            if self.policy == "wait":
                first = min(self._in_flight | self._completed.keys(), default=None)
                if first is not None and first in self._completed:
                    return self._completed.pop(first)
            elif self._completed:
                return self._completed.pop(min(self._completed))
            if not self._in_flight and not self._completed and self._client is None:
                raise RuntimeError("take_batch before any weights were published")
            self._cond.wait()
