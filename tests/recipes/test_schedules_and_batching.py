"""Learning-rate schedules and the step -> batch plan (pure functions, no server)."""

from __future__ import annotations

import math

import pytest

from tether.recipes.batching import BatchPlan
from tether.recipes.schedules import lr_multiplier
from tether.types.errors import UserInputError


def test_schedules_without_warmup():
    assert [lr_multiplier("constant", s, 4) for s in range(4)] == [1.0] * 4
    assert [lr_multiplier("linear", s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    cosine = [lr_multiplier("cosine", s, 4) for s in range(4)]
    assert cosine == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])


def test_warmup_rises_linearly_then_the_schedule_decays_over_the_rest():
    values = [lr_multiplier("linear", s, 6, warmup_steps=2) for s in range(6)]
    assert values == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert lr_multiplier("cosine", 2, 6, warmup_steps=2) == pytest.approx(1.0)


def test_bad_schedule_settings_are_user_errors():
    with pytest.raises(UserInputError) as info:
        lr_multiplier("exponential", 0, 10)  # type: ignore[arg-type]
    assert info.value.field == "lr_schedule"
    with pytest.raises(UserInputError):
        lr_multiplier("linear", 0, 0)


def test_each_epoch_is_a_permutation_and_the_incomplete_batch_is_dropped():
    plan = BatchPlan(num_examples=10, batch_size=3, num_epochs=2, seed=7)
    assert (plan.batches_per_epoch, plan.total_steps) == (3, 6)
    for epoch in range(2):
        seen = [i for step in range(epoch * 3, epoch * 3 + 3) for i in plan.indices(step)]
        assert len(seen) == len(set(seen)) == 9
    assert plan.indices(0) != plan.indices(3), "a new epoch reshuffles"


def test_the_plan_is_a_pure_function_of_the_step():
    first = BatchPlan(num_examples=50, batch_size=4, num_epochs=3, seed=1)
    again = BatchPlan(num_examples=50, batch_size=4, num_epochs=3, seed=1)
    assert [first.indices(s) for s in range(first.total_steps)] == [
        again.indices(s) for s in range(again.total_steps)
    ]
    assert BatchPlan(50, 4, 3, seed=2).indices(0) != first.indices(0)


def test_plan_validation_names_the_field():
    with pytest.raises(UserInputError) as info:
        BatchPlan(num_examples=2, batch_size=4)
    assert info.value.field == "batch_size"
    with pytest.raises(UserInputError) as info:
        BatchPlan(num_examples=8, batch_size=4).indices(2)
    assert info.value.field == "step"
