"""GRPO: sample a group of answers per prompt, reward them, and push up the better-than-average ones.

Each step takes fresh sampler weights from the trainer (`save_weights_and_get_sampling_client`),
samples `group_size` completions for each of `batch_size` prompts, scores them with the exact-
answer reward, sets advantages to reward minus the group mean, and trains with the
`importance_sampling` or `ppo` loss. The trainer's logprobs of the sampled tokens come back with
the `forward_backward`, so the sampler-vs-trainer KL is reported every step at no extra cost.
Groups whose rewards are all equal carry no signal and are skipped (unless configured otherwise).
Checkpoints and resume work as in SFT: a rerun continues with the next unseen prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tether.recipes.addition import AdditionTask, exact_answer_reward
from tether.recipes.compat import SdkTypes
from tether.recipes.evaluation import heldout_accuracy
from tether.recipes.problems import DatasetProblems, ProblemSource
from tether.recipes.progress import progress_bar
from tether.recipes.rl_data import rl_datum, sampled_positions
from tether.recipes.rl_math import group_advantages, kl_sample_train
from tether.recipes.run_log import CheckpointRecord
from tether.recipes.run_settings import SampledRunSettings, connect_run, open_sampled_run
from tether.renderers import Renderer, renderer_for_model
from tether.types.data import Datum, SamplingParams
from tether.types.errors import ServerError

log = logging.getLogger("tether.recipes.grpo")


class Config(SampledRunSettings):
    """Settings of a GRPO run."""

    dataset_path: Path | None = Field(
        None,
        description='JSONL of prompts, one {"messages": [...], "answer": "..."} per line (exact-answer reward).',
    )
    test_size: int = Field(
        100,
        ge=0,
        description="Held-out prompts for accuracy (rows of dataset_path, or environment problems).",
    )
    log_dir: Path = Field(
        Path("runs/grpo"), description="Where metrics.jsonl, config.json and checkpoints.jsonl go."
    )
    load_checkpoint_path: str | None = Field(
        None,
        description="Start from the weights of this tinker:// state checkpoint (e.g. the end of an SFT run).",
    )
    loss_fn: Literal["importance_sampling", "ppo"] = Field(
        "importance_sampling", description="Policy-gradient loss."
    )
    ppo_clip_low: float = Field(0.8, gt=0, description="PPO: lower clip of the probability ratio.")
    ppo_clip_high: float = Field(1.2, gt=0, description="PPO: upper clip of the probability ratio.")
    group_size: int = Field(
        8, ge=2, description="Samples per prompt; advantages are relative to the group mean."
    )
    temperature: float = Field(1.0, ge=0, description="Sampling temperature for the rollouts.")
    remove_constant_reward_groups: bool = Field(
        True, description="Skip groups whose samples all got the same reward."
    )
    eval_every: int | None = Field(
        10, ge=1, description="Held-out greedy accuracy every this many steps and at the end (unset: never)."
    )


@dataclass
class GRPOResult:
    training_client: Any
    renderer: Renderer
    steps_run: int
    final_state_path: str | None
    final_accuracy: float | None
    metrics: list[dict[str, Any]] = field(default_factory=list)


def problem_source(config: Config) -> ProblemSource:
    if config.dataset_path is not None:
        return DatasetProblems.from_jsonl(config.dataset_path, test_size=config.test_size, seed=config.seed)
    return AdditionTask(
        num_operands=config.num_operands,
        num_digits=config.num_digits,
        seed=config.seed,
        num_heldout=config.test_size,
    )


def loss_fn_config(config: Config) -> dict[str, float] | None:
    if config.loss_fn == "ppo":
        return {"clip_low_threshold": config.ppo_clip_low, "clip_high_threshold": config.ppo_clip_high}
    return None


@dataclass
class Rollout:
    datum: Datum
    sampler_logprobs: list[float]
    prompt_length: int
    group_trains: bool


def _rollouts(
    config: Config, step: int, sampling_client: Any, renderer: Renderer, source: ProblemSource
) -> tuple[list[Rollout], dict[str, float]]:
    problems = [source.train_problem(step * config.batch_size + i) for i in range(config.batch_size)]
    prompts = [renderer.build_generation_prompt(p.messages) for p in problems]
    sdk = SdkTypes(sampling_client)
    futures = [
        sampling_client.sample(
            sdk.model_input(prompt),
            config.group_size,
            sdk.sampling_params(
                SamplingParams(
                    max_tokens=config.max_tokens,
                    temperature=config.temperature,
                    stop=renderer.get_stop_sequences(),
                    seed=(config.seed * 1_000_003 + step * 1_009 + index) % (2**31),
                )
            ),
        )
        for index, prompt in enumerate(prompts)
    ]
    rollouts: list[Rollout] = []
    all_rewards: list[float] = []
    groups = {"all_good": 0, "all_bad": 0, "mixed": 0}
    for problem, prompt, future in zip(problems, prompts, futures, strict=True):
        sequences = [s for s in future.result().sequences if s.tokens]
        if not sequences:
            continue
        rewards = [exact_answer_reward(*renderer.parse_response(s.tokens), problem.answer) for s in sequences]
        all_rewards += rewards
        advantages = group_advantages(rewards)
        constant = max(rewards) == min(rewards)
        groups["mixed" if not constant else ("all_good" if rewards[0] > 0 else "all_bad")] += 1
        for sequence, advantage in zip(sequences, advantages, strict=True):
            if sequence.logprobs is None:
                raise ServerError("the sampler returned no logprobs for the sampled tokens")
            rollouts.append(
                Rollout(
                    datum=rl_datum(prompt, sequence.tokens, sequence.logprobs, advantage),
                    sampler_logprobs=list(sequence.logprobs),
                    prompt_length=prompt.length,
                    group_trains=not (constant and config.remove_constant_reward_groups),
                )
            )
    num_groups = max(1, sum(groups.values()))
    metrics = {
        "reward/mean": sum(all_rewards) / len(all_rewards) if all_rewards else float("nan"),
        **{f"by_group/frac_{k}": v / num_groups for k, v in groups.items()},
        "num_samples": float(len(rollouts)),
    }
    return rollouts, metrics


def train_grpo(
    config: Config,
    service: Any,
    source: ProblemSource,
    *,
    training_client: Any = None,
    on_step_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> GRPOResult:
    """Run (or resume) GRPO with an existing service client; `training_client` continues a model in hand."""
    run = open_sampled_run(config, service, training_client)
    run_log, training_client, start_step, checkpoint = (
        run.run_log,
        run.training_client,
        run.start_step,
        run.checkpoint,
    )

    renderer = renderer_for_model(config.model_name, training_client.get_tokenizer(), config.renderer_name)
    heldout = source.heldout_problems()
    final_state_path = checkpoint.state_path if checkpoint is not None else None
    final_accuracy: float | None = None
    bar = progress_bar(total=config.num_steps, initial=start_step, desc="GRPO", enabled=config.progress)
    for step in range(start_step, config.num_steps):
        sampling_client = training_client.save_weights_and_get_sampling_client().result()
        metrics: dict[str, Any] = {}
        if config.eval_every and heldout and step % config.eval_every == 0:
            metrics["test/accuracy"] = heldout_accuracy(sampling_client, renderer, heldout, config.max_tokens)
        rollouts, rollout_metrics = _rollouts(config, step, sampling_client, renderer, source)
        metrics.update(rollout_metrics)
        metrics.update(train_step(config, training_client, rollouts))
        next_step = step + 1
        if next_step == config.num_steps and config.eval_every and heldout:
            final_sampler = training_client.save_weights_and_get_sampling_client().result()
            final_accuracy = heldout_accuracy(final_sampler, renderer, heldout, config.max_tokens)
            metrics["test/final_accuracy"] = final_accuracy
        if on_step_end is not None:
            on_step_end(step, metrics)
        # Log before saving: a crash in between leaves a row that resume truncates, never a gap.
        run_log.log_metrics(step, metrics, training_client=training_client)
        if next_step == config.num_steps or (config.save_every and next_step % config.save_every == 0):
            name = f"grpo-{next_step:06d}"
            final_state_path = training_client.save_state(name).result().path
            run_log.record_checkpoint(
                CheckpointRecord(name=name, next_step=next_step, state_path=final_state_path)
            )
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}")
    bar.close()
    run_log.close()
    return GRPOResult(
        training_client,
        renderer,
        config.num_steps - start_step,
        final_state_path,
        final_accuracy,
        run_log.metrics(),
    )


def train_step(config: Config, training_client: Any, rollouts: list[Rollout]) -> dict[str, float]:
    """forward_backward + optim_step on the groups that carry signal; KL from the trainer's logprobs.

    With no such group the step still measures the KL with a gradient-free `forward` and does not
    move the weights.
    """
    trained = [r for r in rollouts if r.group_trains]
    measured = trained or rollouts
    if not measured:
        return {}
    sdk = SdkTypes(training_client)
    data = sdk.data([r.datum for r in measured])
    if trained:
        output_future = training_client.forward_backward(data, config.loss_fn, loss_fn_config(config))
        optim_future = training_client.optim_step(sdk.adam_params(config.learning_rate))
        output = output_future.result()
        optim_future.result()
    else:
        output = training_client.forward(data, config.loss_fn, loss_fn_config(config)).result()
    metrics = sampler_trainer_kl(measured, output)
    metrics["num_trained_samples"] = float(len(trained))
    metrics["learning_rate"] = config.learning_rate if trained else 0.0
    return metrics


def sampler_trainer_kl(rollouts: list[Rollout], output: Any) -> dict[str, float]:
    """`kl_sample_train_v1/v2` of the sampled tokens, from a forward's outputs on `rollouts`' datums."""
    trainer_logprobs = [
        output.loss_fn_outputs[i]["logprobs"].tolist()[
            sampled_positions(r.prompt_length, len(r.sampler_logprobs))
        ]
        for i, r in enumerate(rollouts)
    ]
    return kl_sample_train([r.sampler_logprobs for r in rollouts], trainer_logprobs)


def main(config: Config) -> GRPOResult:
    """`tether grpo`: connect and train on the configured environment or dataset."""
    source = problem_source(config)
    service = connect_run(config)
    try:
        return train_grpo(config, service, source)
    finally:
        service.close()
