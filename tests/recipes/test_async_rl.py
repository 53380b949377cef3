"""Asynchronous RL: the rollout queue's staleness bound, its two policies and its snapshot (with a fake
sampler whose groups finish in a jittered order), then `train_rl` through a local server with
`max_steps_off_policy=2`, interrupted and resumed without losing a group."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest

from tether.recipes import rl
from tether.recipes.rollout_queue import AsyncRollouts, RolloutGroup, Sample
from tether.types.errors import UserInputError


class FakeSampler:
    """Groups that take a random few milliseconds; `hold` makes chosen groups wait for an event."""

    def __init__(self, seed: int = 0, hold: dict[int, threading.Event] | None = None) -> None:
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.calls: list[tuple[int, int]] = []
        self.hold = hold or {}

    def __call__(self, client, index: int, version: int) -> RolloutGroup:
        with self.lock:
            self.calls.append((index, version))
            delay = self.rng.uniform(0, 0.004)
        if index in self.hold:
            self.hold[index].wait(10)
        else:
            time.sleep(delay)
        return RolloutGroup(index, version, [1, 2], [Sample([3], [-0.5], float(index % 2))])


def _train(queue: AsyncRollouts, steps: range, on_step=None) -> list[tuple[int, list[RolloutGroup], int]]:
    """A fake trainer: take a batch, 'train' for a moment, publish the next weights."""
    taken = []
    for step in steps:
        groups, dropped = queue.take_batch(step)
        taken.append((step, groups, dropped))
        if on_step:
            on_step(step)
        time.sleep(0.002)
        queue.publish(object(), step + 1)
    return taken


@pytest.mark.parametrize("bound", [0, 1, 2])
def test_wait_policy_keeps_staleness_within_the_bound_and_trains_every_group_once_in_order(bound):
    sampler = FakeSampler(seed=bound)
    queue = AsyncRollouts(sampler, batch_size=3, max_steps_off_policy=bound, policy="wait")
    queue.publish(object(), 0)
    taken = _train(queue, range(12))
    queue.close()
    lags = [step - g.version for step, groups, _ in taken for g in groups]
    assert max(lags) <= bound and not any(d for _, _, d in taken)
    if bound:
        assert max(lags) == bound, "sampling does run ahead of the trainer"
    assert [g.index for _, groups, _ in taken for g in groups] == list(range(36))
    assert len({i for i, _ in sampler.calls}) == len(sampler.calls), "no group sampled twice"


def _settle(queue: AsyncRollouts, held: set[int]) -> None:
    """Wait until every group in flight is a held one: makes which groups are done at a step exact."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with queue._cond:
            if queue._in_flight <= held:
                return
        time.sleep(0.001)
    raise AssertionError("fake groups did not finish")


def test_drop_policy_trains_around_a_slow_group_and_drops_it_once_it_is_too_stale():
    release = threading.Event()
    sampler = FakeSampler(hold={4: release})
    queue = AsyncRollouts(sampler, batch_size=2, max_steps_off_policy=1, policy="drop")
    queue.publish(object(), 0)
    taken = []
    for step in range(7):
        # Every other group has finished before the batch is taken, whatever the machine's load: the
        # only group that can be late is the held one, so the test does not depend on thread timing.
        _settle(queue, set() if release.is_set() else {4})
        groups, dropped = queue.take_batch(step)
        taken.append((step, groups, dropped))
        if step == 3:
            release.set()
        queue.publish(object(), step + 1)
    queue.close()
    trained = [g.index for _, groups, _ in taken for g in groups]
    assert 4 not in trained and len(trained) == len(set(trained)) == 14
    assert sum(d for _, _, d in taken) == 1, "group 4 came back beyond the bound and was dropped"
    assert all(step - g.version <= 1 for step, groups, _ in taken for g in groups)

    # The same slow group under "wait" holds training up instead, and is trained.
    release = threading.Event()
    queue = AsyncRollouts(FakeSampler(hold={4: release}), batch_size=2, max_steps_off_policy=1, policy="wait")
    queue.publish(object(), 0)
    threading.Timer(0.2, release.set).start()
    taken = _train(queue, range(6))
    queue.close()
    assert [g.index for _, groups, _ in taken for g in groups] == list(range(12))


@pytest.mark.parametrize("policy", ["wait", "drop"])
def test_a_snapshot_restores_every_sampled_group_so_none_is_lost_or_sampled_again(policy):
    first_sampler = FakeSampler(seed=1)
    queue = AsyncRollouts(first_sampler, batch_size=3, max_steps_off_policy=2, policy=policy)
    queue.publish(object(), 0)
    before = _train(queue, range(4))
    state = json.loads(json.dumps(queue.snapshot()))  # as written to disk
    queue.close()
    assert state["trained"] == 12 and len(state["groups"]) == state["next_index"] - 12 > 0

    second_sampler = FakeSampler(seed=2)
    resumed = AsyncRollouts(second_sampler, batch_size=3, max_steps_off_policy=2, policy=policy, state=state)
    resumed.publish(object(), 4)
    after = _train(resumed, range(4, 8))
    resumed.close()
    trained = [g.index for _, groups, _ in before + after for g in groups]
    assert sorted(trained) == list(range(24)), "every group trained exactly once across the restart"
    restored = {row["index"]: row["version"] for row in state["groups"]}
    assert not restored.keys() & {i for i, _ in second_sampler.calls}, "restored groups are not sampled again"
    versions = {g.index: g.version for _, groups, _ in after for g in groups}
    assert all(versions[i] == v for i, v in restored.items())
    assert all(step - g.version <= 2 for step, groups, _ in before + after for g in groups)


def test_bad_settings_name_the_field():
    with pytest.raises(UserInputError) as info:
        AsyncRollouts(FakeSampler(), batch_size=2, max_steps_off_policy=-1)
    assert info.value.field == "max_steps_off_policy"
    with pytest.raises(UserInputError) as info:
        AsyncRollouts(FakeSampler(), batch_size=2, max_steps_off_policy=1, policy="later")  # type: ignore[arg-type]
    assert info.value.field == "stale_groups"


class _Interrupted(Exception):
    pass


@pytest.mark.slow
def test_async_rl_keeps_staleness_within_two_steps_and_a_resume_loses_no_group(tmp_path, local_service):
    config = rl.Config(
        log_dir=tmp_path / "rl", lora_rank=8, learning_rate=1e-3, batch_size=2, group_size=4, num_steps=6,
        max_tokens=4, num_operands=2, test_size=10, eval_every=None, save_every=3, max_steps_off_policy=2,
        remove_constant_reward_groups=False, progress=False,
    )  # fmt: skip
    source = rl.grpo.problem_source(config)

    def interrupt(step, metrics):
        if step == 4:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        rl.train_rl(config, local_service, source, on_step_end=interrupt)
    checkpoint = json.loads((tmp_path / "rl" / "checkpoints.jsonl").read_text().splitlines()[0])
    assert checkpoint["next_step"] == 3
    pending = json.loads((tmp_path / "rl" / checkpoint["extra"]["rollouts"]).read_text())
    saved = {row["index"]: row["version"] for row in pending["groups"]}
    assert sorted(saved) == list(range(6, 12)), "the groups sampled ahead were checkpointed"

    result = rl.train_rl(config, local_service, source)
    assert result.steps_run == 3
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    trained = [(index, version) for r in rows for index, version in r["async/groups"]]
    assert sorted(i for i, _ in trained) == list(range(12)), "every group trained once, none lost"
    assert {i: v for i, v in trained if i >= 6} == saved, (
        "the resumed run trained the saved groups as sampled"
    )
    for r in rows:
        assert 0 <= r["async/staleness_min"] <= r["async/staleness_mean"] <= r["async/staleness_max"] <= 2
        assert all(r["step"] - v <= 2 for _, v in r["async/groups"])
    assert max(r["async/staleness_max"] for r in rows) == 2


def test_a_resume_with_a_lower_bound_drops_the_saved_groups_it_no_longer_allows():
    queue = AsyncRollouts(FakeSampler(), batch_size=2, max_steps_off_policy=2, policy="wait")
    queue.publish(object(), 0)
    _train(queue, range(3))
    state = queue.snapshot()
    queue.close()
    resumed = AsyncRollouts(
        FakeSampler(seed=3), batch_size=2, max_steps_off_policy=0, policy="wait", state=state
    )
    resumed.publish(object(), 3)
    taken = _train(resumed, range(3, 6))
    resumed.close()
    assert all(step == g.version for step, groups, _ in taken for g in groups), "on-policy from now on"
    stale = [row for row in state["groups"] if row["version"] < 3]
    assert sum(d for _, _, d in taken) >= len(stale) > 0
