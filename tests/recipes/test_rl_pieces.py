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


def test_addition_task_is_deterministic_and_keeps_heldout_multisets_out_of_training():
    task = AdditionTask(num_operands=3, num_digits=1, seed=3, num_heldout=50)
    heldout = task.heldout_problems()
    heldout_keys = {tuple(sorted(map(int, p.messages[0]["content"].split("+")))) for p in heldout}
    assert len(heldout) == len(heldout_keys) == 50
    train = [task.train_problem(i) for i in range(2000)]
    train_keys = {tuple(sorted(map(int, p.messages[0]["content"].split("+")))) for p in train}
    assert not heldout_keys & train_keys, "no reordering of a held-out problem is trained on"
    sft = task.sft_conversation(7)  # SFT examples are training problems with their answers
    assert sft[:-1] == train[7].messages and sft[-1] == {"role": "assistant", "content": train[7].answer}
    again = AdditionTask(num_operands=3, num_digits=1, seed=3, num_heldout=50)
    assert [p.messages for p in train[:20]] == [again.train_problem(i).messages for i in range(20)]
    operands = list(map(int, train[0].messages[0]["content"].split("+")))
    assert len(operands) == 3 and train[0].answer == str(sum(operands))
    two_digit = AdditionTask(num_operands=2, num_digits=2).train_problem(0)
    assert two_digit.answer == str(sum(map(int, two_digit.messages[0]["content"].split("+"))))


def test_addition_task_refuses_to_hold_out_most_problems():
    with pytest.raises(UserInputError) as info:
        AdditionTask(num_operands=2, num_digits=1, num_heldout=40)  # only 55 distinct problems
    assert info.value.field == "num_heldout"


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
