"""GRPO arithmetic, RL datums, the addition task and its reward (pure functions, no server)."""

from __future__ import annotations

import pytest
import torch

from tether.recipes.addition import AdditionTask, exact_answer_reward
from tether.recipes.rl_data import rl_datum, sampled_positions
from tether.recipes.rl_math import group_advantages, kl_sample_train
from tether.renderers import ParseTermination
from tether.types.data import ModelInput
from tether.types.errors import UserInputError


def test_advantages_are_reward_minus_group_mean_without_std_scaling():
    assert group_advantages([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages([3.0, 1.0]) == [1.0, -1.0]
    assert group_advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    with pytest.raises(UserInputError):
        group_advantages([])


def test_kl_estimators_match_a_torch_reference():
    torch.manual_seed(0)
    sampler = [torch.randn(n).tolist() for n in (3, 5)]
    trainer = [(torch.tensor(s) + 0.1 * torch.randn(len(s))).tolist() for s in sampler]
    q, p = torch.tensor(sum(sampler, [])), torch.tensor(sum(trainer, []))
    got = kl_sample_train(sampler, trainer)
    assert got["kl_sample_train_v1"] == pytest.approx(float((q - p).mean()), abs=1e-6)
    assert got["kl_sample_train_v2"] == pytest.approx(float(0.5 * ((q - p) ** 2).mean()), abs=1e-6)
    assert kl_sample_train(sampler, sampler) == {"kl_sample_train_v1": 0.0, "kl_sample_train_v2": 0.0}


def test_kl_rejects_misaligned_logprobs_naming_the_sequence():
    with pytest.raises(UserInputError) as info:
        kl_sample_train([[0.1, 0.2], [0.3]], [[0.1, 0.2], [0.3, 0.4]])
    assert info.value.datum_index == 1


def test_rl_datum_trains_only_sampled_tokens():
    datum = rl_datum(ModelInput.from_ints([5, 6, 7]), [8, 9], [-0.5, -0.25], advantage=0.75)
    assert datum.model_input.to_ints() == [5, 6, 7, 8]
    inputs = {k: v.tolist() for k, v in datum.loss_fn_inputs.items()}
    assert inputs["target_tokens"] == [6, 7, 8, 9]
    assert inputs["logprobs"] == [0.0, 0.0, -0.5, -0.25]
    assert inputs["advantages"] == [0.0, 0.0, 0.75, 0.75]
    assert inputs["target_tokens"][sampled_positions(3, 2)] == [8, 9]
    with pytest.raises(UserInputError) as info:
        rl_datum(ModelInput.from_ints([5]), [8, 9], [-0.5], advantage=1.0)
    assert info.value.field == "sampled_logprobs"


def test_addition_task_is_deterministic_and_keeps_heldout_problems_out_of_training():
    task = AdditionTask(num_digits=2, seed=3, num_heldout=50)
    heldout = {p.messages[0]["content"] for p in task.heldout_problems()}
    assert len(heldout) == 50
    train = [task.train_problem(i) for i in range(2000)]
    assert not heldout & {p.messages[0]["content"] for p in train}
    assert [p.answer for p in train[:20]] == [
        AdditionTask(2, seed=3, num_heldout=50).train_problem(i).answer for i in range(20)
    ]
    a, b = map(int, train[0].messages[0]["content"].split("+"))
    assert train[0].answer == str(a + b)


def test_exact_answer_reward_needs_a_clean_end_and_the_exact_number():
    assert (
        exact_answer_reward({"role": "assistant", "content": " 46 "}, ParseTermination.STOP_SEQUENCE, "46")
        == 1.0
    )
    assert (
        exact_answer_reward({"role": "assistant", "content": "46"}, ParseTermination.MALFORMED, "46") == 0.0
    )
    assert (
        exact_answer_reward({"role": "assistant", "content": "47"}, ParseTermination.STOP_SEQUENCE, "46")
        == 0.0
    )
