"""Admission decisions of the sampling scheduler, with fake work and no model."""

from __future__ import annotations

import pytest

from tether.engine.sampling.scheduler import Scheduler, SchedulerConfig, WorkCost, prefill_batches
from tether.types.errors import ConfigurationError, OverloadedError, UserInputError


def cost(tokens: int, sequences: int = 1, prefill: int = 1) -> WorkCost:
    return WorkCost(reserved_tokens=tokens, num_sequences=sequences, prefill_tokens=prefill)


def make(**overrides) -> Scheduler[str]:
    config = dict(
        kv_cache_budget_tokens=100, max_batch_size=4, max_prefill_tokens_per_step=50, max_waiting_requests=3
    )
    config.update(overrides)
    return Scheduler(SchedulerConfig(**config))


def test_admits_in_arrival_order_within_the_token_budget():
    scheduler = make()
    for name, tokens in [("a", 40), ("b", 50), ("c", 20)]:
        scheduler.add(name, cost(tokens))
    assert scheduler.schedule() == ["a", "b"]
    assert scheduler.reserved_tokens == 90
    assert scheduler.queue_depth == 1
    assert scheduler.schedule() == []  # c (20) would exceed 100
    scheduler.release(40, 1)
    assert scheduler.schedule() == ["c"]
    assert scheduler.reserved_tokens == 70


def test_head_that_does_not_fit_blocks_smaller_requests_behind_it():
    scheduler = make()
    scheduler.add("big", cost(80))
    assert scheduler.schedule() == ["big"]
    scheduler.add("big2", cost(60))
    scheduler.add("small", cost(5))
    assert scheduler.schedule() == []  # strict FIFO: big2 is not starved by small ones
    scheduler.release(80, 1)
    assert scheduler.schedule() == ["big2", "small"]


def test_batch_size_caps_running_sequences():
    scheduler = make()
    scheduler.add("three", cost(10, sequences=3))
    scheduler.add("two", cost(10, sequences=2))
    assert scheduler.schedule() == ["three"]
    assert scheduler.running_sequences == 3
    scheduler.release(10, 3)
    assert scheduler.schedule() == ["two"]


def test_prefill_allowance_spreads_prompts_over_steps_but_always_admits_one():
    scheduler = make(max_prefill_tokens_per_step=50, max_batch_size=10)
    scheduler.add("long", cost(10, prefill=70))
    scheduler.add("a", cost(10, prefill=30))
    scheduler.add("b", cost(10, prefill=30))
    assert scheduler.schedule() == ["long"]
    assert scheduler.schedule() == ["a"]
    assert scheduler.schedule() == ["b"]


def test_full_queue_is_overload_and_impossible_work_is_a_user_error():
    scheduler = make()
    for name in "abc":
        scheduler.add(name, cost(1))
    with pytest.raises(OverloadedError):
        scheduler.add("d", cost(1))
    with pytest.raises(UserInputError) as err:
        scheduler.add("huge", cost(101))
    assert err.value.field == "max_tokens"
    with pytest.raises(UserInputError) as err:
        scheduler.add("wide", cost(10, sequences=5))
    assert err.value.field == "num_samples"
    assert scheduler.queue_depth == 3


def test_release_more_than_reserved_is_a_bug():
    scheduler = make()
    scheduler.add("a", cost(10))
    scheduler.schedule()
    with pytest.raises(AssertionError):
        scheduler.release(20, 1)


def test_drain_empties_the_queue():
    scheduler = make()
    scheduler.add("a", cost(10))
    assert scheduler.drain() == ["a"]
    assert not scheduler.has_waiting


def test_remove_where_takes_cancelled_requests_out_of_the_queue_unreserved():
    scheduler = make()
    scheduler.add("big", cost(80))
    assert scheduler.schedule() == ["big"]
    for name in ("x", "y", "z"):
        scheduler.add(name, cost(30))
    asked: list[str] = []

    def cancelled(name: str) -> bool:
        asked.append(name)
        return name != "y"

    assert scheduler.remove_where(cancelled) == ["x", "z"]
    assert asked == ["x", "y", "z"]  # one look per request
    assert scheduler.queue_depth == 1 and scheduler.reserved_tokens == 80
    scheduler.add("w", cost(10))  # the freed queue slots take new work
    scheduler.release(80, 1)
    assert scheduler.schedule() == ["y", "w"]


def test_config_is_checked():
    with pytest.raises(ConfigurationError) as err:
        SchedulerConfig(max_batch_size=0)
    assert err.value.field == "max_batch_size"


def test_continuous_batching_short_work_leaves_before_long_work():
    """Drive the scheduler like the engine loop with fake decode steps: one token per running job."""
    scheduler = make(max_batch_size=2, kv_cache_budget_tokens=1000)
    remaining = {"long": 20, "short": 3, "later": 2}
    scheduler.add("long", cost(20))
    scheduler.add("short", cost(3))
    scheduler.add("later", cost(2))
    running: list[str] = []
    finished: list[tuple[str, int]] = []
    for step in range(30):
        running += scheduler.schedule()
        for name in list(running):
            remaining[name] -= 1
            if remaining[name] == 0:
                running.remove(name)
                scheduler.release({"long": 20, "short": 3, "later": 2}[name], 1)
                finished.append((name, step))
    assert [name for name, _ in finished] == ["short", "later", "long"]
    assert dict(finished)["later"] < dict(finished)["long"]


def set_partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        yield [[first], *partition]
        for i in range(len(partition)):
            yield [*partition[:i], [first, *partition[i]], *partition[i + 1 :]]


def batching_cost(batches: list[list[int]], lengths: list[int], forward_cost: float) -> float:
    return sum(forward_cost + len(b) * max(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("forward_cost", [0.0, 3.0, 10.0, 64.0, 1000.0])
def test_prefill_batches_are_the_cheapest_of_all_partitions(forward_cost):
    lengths = [60, 2, 1, 58, 30, 29, 30]
    plan = prefill_batches(lengths, forward_cost)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    cheapest = min(batching_cost(p, lengths, forward_cost) for p in set_partitions(list(range(len(lengths)))))
    assert batching_cost(plan, lengths, forward_cost) == cheapest


def test_prefill_batches_edge_cases():
    lengths = [60, 2, 1, 58, 30, 29]
    assert prefill_batches(lengths, 0.0) == [[0], [3], [4], [5], [1], [2]]  # no padding at all
    assert prefill_batches([5, 5, 5], 0.0) == [[0, 1, 2]]  # equal lengths always together
    assert prefill_batches(lengths, 10.0) == [[0, 3], [4, 5], [1, 2]]
    assert prefill_batches(lengths, float("inf")) == [[0, 3, 4, 5, 1, 2]]
    assert prefill_batches([], 10.0) == []
    with pytest.raises(ValueError):
        prefill_batches(lengths, -1.0)
