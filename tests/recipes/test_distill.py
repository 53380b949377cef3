"""On-policy distillation through a local server: the student-teacher KL falls; a missing teacher is named."""

from __future__ import annotations

import json

import pytest

from tether.recipes import distill, sft
from tether.recipes.addition import Problem
from tether.recipes.problems import DatasetProblems
from tether.types.errors import UserInputError

PROMPTS = [[{"role": "user", "content": f"pick {i}"}] for i in range(24)]


def _config(tmp_path, **overrides):
    values = dict(
        log_dir=tmp_path / "distill", lora_rank=0, learning_rate=3e-4, batch_size=4, group_size=4, num_steps=6,
        max_tokens=3, eval_every=3, save_every=3, progress=False,
    )  # fmt: skip
    return distill.Config(**{**values, **overrides})


@pytest.mark.slow
def test_distillation_lowers_the_student_teacher_kl(tmp_path, local_service):
    """Teacher: SFT to answer "a"; student: the same SFT run two steps in (it only half learnt)."""
    conversations = [[*p, {"role": "assistant", "content": "a"}] for p in PROMPTS for _ in range(4)]
    warmup = sft.Config(
        log_dir=tmp_path / "sft", lora_rank=0, learning_rate=3e-3, lr_schedule="constant", batch_size=16,
        eval_every=None, save_every=2, progress=False,
    )  # fmt: skip
    teacher = sft.train_sft(warmup, local_service, conversations).training_client
    teacher_path = teacher.save_weights_for_sampler("teacher").result().path
    early = json.loads((tmp_path / "sft" / "checkpoints.jsonl").read_text().splitlines()[0])
    assert early["next_step"] == 2
    student = local_service.create_training_client_from_state(early["state_path"]).result()

    source = DatasetProblems([Problem(messages=p, answer="") for p in PROMPTS], test_size=8, seed=0)
    result = distill.train_distill(
        _config(tmp_path, teacher_checkpoint=teacher_path), local_service, source, training_client=student
    )
    heldout = [row["test/teacher_kl"] for row in result.metrics if "test/teacher_kl" in row]
    assert len(heldout) == 2 and result.final_teacher_kl is not None
    assert heldout[0] > 0.3, "the half-trained student starts measurably away from the teacher"
    assert result.final_teacher_kl < 0.7 * heldout[0], (heldout, result.final_teacher_kl)
    for row in result.metrics:
        assert abs(row["kl_sample_train_v1"]) < 1e-3 and row["num_tokens"] > 0
    assert [
        json.loads(r)["next_step"]
        for r in (tmp_path / "distill" / "checkpoints.jsonl").read_text().splitlines()
    ] == [3, 6]


def test_a_teacher_the_server_does_not_serve_is_named(tmp_path, local_service):
    source = DatasetProblems([Problem(messages=p, answer="") for p in PROMPTS], test_size=0)
    with pytest.raises(UserInputError) as info:
        distill.train_distill(_config(tmp_path, teacher_model="nobody/not-served"), local_service, source)
    assert info.value.field == "teacher_model" and "nobody/not-served" in info.value.message
    with pytest.raises(UserInputError) as info:
        distill.train_distill(
            _config(tmp_path, teacher_checkpoint="tinker://missing:train:0/sampler_weights/t"),
            local_service,
            source,
        )
    assert info.value.field == "teacher_checkpoint"
    assert not (tmp_path / "distill").exists(), "nothing was started"
