"""On-policy distillation: the student samples, a teacher scores, reverse KL is the advantage.

Each step takes fresh sampler weights from the student (`save_weights_and_get_sampling_client`),
samples `group_size` answers for each of `batch_size` prompts, and has the teacher score every
sampled token with `compute_logprobs` (the teacher is a sampling client on the same server: a base
model it serves, `teacher_model`, or a sampler checkpoint, `teacher_checkpoint`; it must share the
student's tokenizer). The per-token reverse KL estimate k_t = log q(x_t) - log p_teacher(x_t), with q
the student's sampler logprob, becomes the advantage -kl_coef * k_t of an `importance_sampling`
update, as in the tinker-cookbook's `distillation/train_on_policy.py`. Minimising it lowers
KL(student || teacher) on the student's own samples.

Metrics: `teacher_kl` (mean k_t over the step's sampled tokens: the reverse KL estimate),
`kl_sample_train_v1/v2` (sampler vs trainer), `num_tokens`; `test/teacher_kl` on held-out prompts
every `eval_every` steps (before the step) and `test/final_teacher_kl` at the end. Prompts come from
a JSONL file or the built-in addition environment and are index-deterministic, so checkpoints and
resume work as in GRPO.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from tether.recipes.addition import AdditionTask, Problem
from tether.recipes.compat import SdkTypes
from tether.recipes.conversations import load_conversations
from tether.recipes.problems import DatasetProblems, ProblemSource
from tether.recipes.progress import progress_bar
from tether.recipes.rl_data import rl_datum, sampled_positions
from tether.recipes.rl_math import kl_sample_train
from tether.recipes.run_log import CheckpointRecord
from tether.recipes.run_settings import SampledRunSettings, connect_run, open_sampled_run
from tether.renderers import Renderer, renderer_for_model
from tether.types.data import Datum, ModelInput, SamplingParams
from tether.types.errors import ServerError, TetherError, UserInputError

log = logging.getLogger("tether.recipes.distill")


class Config(SampledRunSettings):
    """Settings of an on-policy distillation run."""

    teacher_model: str | None = Field(
        None,
        description="Base model of the teacher, served by the same server (unset: the student's model_name).",
    )
    teacher_checkpoint: str | None = Field(
        None,
        description="tinker:// sampler checkpoint of the teacher (save_weights_for_sampler); unset: the"
        " teacher_model's own weights.",
    )
    dataset_path: Path | None = Field(
        None,
        description='JSONL of prompts, one {"messages": [...]} per line (the student answers the last turn).',
    )
    test_size: int = Field(
        32, ge=0, description="Held-out prompts on which the student-teacher KL is measured."
    )
    log_dir: Path = Field(
        Path("runs/distill"), description="Where metrics.jsonl, config.json and checkpoints.jsonl go."
    )
    model_name: str = Field(
        "tether/tiny-qwen3", description="Base model of the student, as the server names it."
    )
    load_checkpoint_path: str | None = Field(
        None, description="Start the student from the weights of this tinker:// state checkpoint."
    )
    kl_coef: float = Field(
        1.0, gt=0, description="Advantage of a token = -kl_coef * (log q_student - log p_teacher)."
    )
    group_size: int = Field(4, ge=1, description="Student samples per prompt.")
    temperature: float = Field(1.0, gt=0, description="Student sampling temperature.")
    eval_every: int | None = Field(
        10,
        ge=1,
        description="Held-out student-teacher KL every this many steps and at the end (unset: never).",
    )


@dataclass
class DistillResult:
    training_client: Any
    renderer: Renderer
    steps_run: int
    final_state_path: str | None
    final_teacher_kl: float | None
    metrics: list[dict[str, Any]] = field(default_factory=list)


def prompt_source(config: Config) -> ProblemSource:
    """The prompts: rows of `dataset_path` (answers unused), else the addition environment."""
    if config.dataset_path is not None:
        problems = [Problem(messages=m, answer="") for m in load_conversations(config.dataset_path)]
        return DatasetProblems(problems, test_size=config.test_size, seed=config.seed)
    return AdditionTask(
        config.num_operands, config.num_digits, seed=config.seed, num_heldout=config.test_size
    )


def connect_teacher(config: Config, service: Any) -> Any:
    """The teacher's sampling client; a teacher the server does not serve raises naming the field."""
    if config.teacher_checkpoint is not None:
        field_name, kwargs = "teacher_checkpoint", {"model_path": config.teacher_checkpoint}
    else:
        field_name, kwargs = "teacher_model", {"base_model": config.teacher_model or config.model_name}
    try:
        return service.create_sampling_client(**kwargs).result()
    except (TetherError, ValueError) as exc:
        raise UserInputError(f"the teacher is not served: {exc}", field=field_name) from None
    except Exception as exc:  # the official tinker SDK raises its own error classes
        if type(exc).__module__.split(".", 1)[0] != "tinker":
            raise
        raise UserInputError(f"the teacher is not served: {exc}", field=field_name) from None


@dataclass
class _Sample:
    datum: Datum
    sampler_logprobs: list[float]
    prompt_length: int
    teacher_kl: list[float]


def _score(teacher: Any, prompt: ModelInput, tokens: list[int], field_name: str) -> Any:
    sdk = SdkTypes(teacher)
    try:
        return teacher.compute_logprobs(sdk.model_input(ModelInput.from_ints(prompt.to_ints() + tokens)))
    except TetherError as exc:
        raise UserInputError(
            f"the teacher cannot score the student's tokens (do they share a tokenizer?): {exc}",
            field=field_name,
        ) from None


def distillation_samples(
    config: Config,
    student: Any,
    teacher: Any,
    renderer: Renderer,
    problems: Sequence[Problem],
    seed: int,
) -> list[_Sample]:
    """`group_size` student samples per prompt, each scored by the teacher, as training datums.

    All sampling requests are in flight at once, then all teacher scorings.
    """
    teacher_field = "teacher_checkpoint" if config.teacher_checkpoint else "teacher_model"
    prompts = [renderer.build_generation_prompt(p.messages) for p in problems]
    sdk = SdkTypes(student)
    futures = [
        student.sample(
            sdk.model_input(prompt),
            config.group_size,
            sdk.sampling_params(
                SamplingParams(
                    max_tokens=config.max_tokens,
                    temperature=config.temperature,
                    stop=renderer.get_stop_sequences(),
                    seed=(seed * 1_009 + index) % (2**31),
                )
            ),
        )
        for index, prompt in enumerate(prompts)
    ]
    sampled = []
    for prompt, future in zip(prompts, futures, strict=True):
        for sequence in future.result().sequences:
            if not sequence.tokens:
                continue
            if sequence.logprobs is None:
                raise ServerError("the sampler returned no logprobs for the sampled tokens")
            tokens = list(sequence.tokens)
            sampled.append(
                (prompt, tokens, list(sequence.logprobs), _score(teacher, prompt, tokens, teacher_field))
            )
    samples = []
    for prompt, tokens, logprobs, teacher_future in sampled:
        try:
            scored = teacher_future.result()
        except TetherError as exc:
            raise UserInputError(
                f"the teacher cannot score the student's tokens (do they share a tokenizer?): {exc}",
                field=teacher_field,
            ) from None
        teacher_logprobs = scored[prompt.length : prompt.length + len(tokens)]
        if len(teacher_logprobs) != len(tokens) or any(x is None for x in teacher_logprobs):
            raise ServerError("compute_logprobs returned no logprob for some sampled token")
        kl = [float(q) - float(p) for q, p in zip(logprobs, teacher_logprobs, strict=True)]
        advantages = [-config.kl_coef * k for k in kl]
        samples.append(_Sample(rl_datum(prompt, tokens, logprobs, advantages), logprobs, prompt.length, kl))
    return samples


def mean_teacher_kl(samples: Sequence[_Sample]) -> float:
    """Token-mean reverse KL estimate, mean of log q - log p_teacher over every sampled token."""
    values = [k for s in samples for k in s.teacher_kl]
    return sum(values) / len(values) if values else float("nan")


def train_distill(
    config: Config,
    service: Any,
    source: ProblemSource,
    *,
    training_client: Any = None,
    on_step_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> DistillResult:
    """Run (or resume) on-policy distillation with an existing service client."""
    teacher = connect_teacher(config, service)
    run = open_sampled_run(config, service, training_client)
    run_log, training_client, start_step, checkpoint = (
        run.run_log,
        run.training_client,
        run.start_step,
        run.checkpoint,
    )

    renderer = renderer_for_model(config.model_name, training_client.get_tokenizer(), config.renderer_name)
    heldout = source.heldout_problems()

    def heldout_kl(student: Any) -> float:
        return mean_teacher_kl(distillation_samples(config, student, teacher, renderer, heldout, seed=-1))

    final_state_path = checkpoint.state_path if checkpoint is not None else None
    final_kl: float | None = None
    bar = progress_bar(total=config.num_steps, initial=start_step, desc="distill", enabled=config.progress)
    for step in range(start_step, config.num_steps):
        student = training_client.save_weights_and_get_sampling_client().result()
        metrics: dict[str, Any] = {}
        if config.eval_every and heldout and step % config.eval_every == 0:
            metrics["test/teacher_kl"] = heldout_kl(student)
        problems = [source.train_problem(step * config.batch_size + i) for i in range(config.batch_size)]
        samples = distillation_samples(
            config, student, teacher, renderer, problems, seed=config.seed * 1_000_003 + step
        )
        metrics["teacher_kl"] = mean_teacher_kl(samples)
        metrics["num_tokens"] = float(sum(len(s.teacher_kl) for s in samples))
        metrics.update(_train_step(config, training_client, samples))
        next_step = step + 1
        if next_step == config.num_steps and config.eval_every and heldout:
            final_kl = heldout_kl(training_client.save_weights_and_get_sampling_client().result())
            metrics["test/final_teacher_kl"] = final_kl
        if on_step_end is not None:
            on_step_end(step, metrics)
        run_log.log_metrics(step, metrics)
        if next_step == config.num_steps or (config.save_every and next_step % config.save_every == 0):
            name = f"distill-{next_step:06d}"
            final_state_path = training_client.save_state(name).result().path
            run_log.record_checkpoint(
                CheckpointRecord(name=name, next_step=next_step, state_path=final_state_path)
            )
        bar.update(1)
        bar.set_postfix(kl=f"{metrics['teacher_kl']:.3f}")
    bar.close()
    run_log.close()
    return DistillResult(
        training_client,
        renderer,
        config.num_steps - start_step,
        final_state_path,
        final_kl,
        run_log.metrics(),
    )


def _train_step(config: Config, training_client: Any, samples: list[_Sample]) -> dict[str, float]:
    if not samples:
        return {"learning_rate": 0.0}
    sdk = SdkTypes(training_client)
    output_future = training_client.forward_backward(
        sdk.data([s.datum for s in samples]), "importance_sampling"
    )
    optim_future = training_client.optim_step(sdk.adam_params(config.learning_rate))
    output = output_future.result()
    optim_metrics = optim_future.result().metrics or {}
    trainer_logprobs = [
        output.loss_fn_outputs[i]["logprobs"].tolist()[
            sampled_positions(s.prompt_length, len(s.sampler_logprobs))
        ]
        for i, s in enumerate(samples)
    ]
    metrics = kl_sample_train([s.sampler_logprobs for s in samples], trainer_logprobs)
    metrics["learning_rate"] = config.learning_rate
    metrics.update({f"optim/{k}": v for k, v in optim_metrics.items()})
    return metrics


def main(config: Config) -> DistillResult:
    """`tether distill`: connect, check the teacher, distill on the configured prompts."""
    source = prompt_source(config)
    service = connect_run(config)
    try:
        return train_distill(config, service, source)
    finally:
        service.close()
