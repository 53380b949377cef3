"""Asynchronous off-policy RL: the `tether rl` recipe (GRPO-style, sampling overlapped with training).

While the trainer runs step `s`, groups for the next `max_steps_off_policy` steps are sampled in
the background on the latest weights the trainer has published (a sampler snapshot after every
optimizer step, `save_weights_and_get_sampling_client`); see `rollout_queue` for the bound and for
what happens to a group that would exceed it (`stale_groups`: the trainer waits for it, or drops
it). The update corrects for the lag by importance sampling: each datum carries the logprobs the
*sampler* reported, so `importance_sampling` weights a token by exp(logp_trainer - logp_sampler)
(or `ppo` clips that ratio). `max_steps_off_policy=0` is synchronous on-policy GRPO.

Each step logs `async/staleness_min|mean|max` of the groups it trains, `async/dropped_groups`, the
sampler-vs-trainer KL (non-zero off-policy: it measures the lag), rewards and, in
`async/groups`, which groups (prompt number, weights version) it trained. A checkpoint saves the
trainer's state and, in `<log_dir>/rollouts/`, every sampled group not yet trained (the groups in
flight are waited for first), so a resumed run trains exactly those groups and loses none.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from tether.recipes import grpo
from tether.recipes.addition import exact_answer_reward
from tether.recipes.compat import SdkTypes
from tether.recipes.evaluation import heldout_accuracy
from tether.recipes.problems import ProblemSource
from tether.recipes.progress import progress_bar
from tether.recipes.rl_data import rl_datum
from tether.recipes.rl_math import group_advantages
from tether.recipes.rollout_queue import AsyncRollouts, RolloutGroup, Sample, StalePolicy
from tether.recipes.run_log import CheckpointRecord, RunLog
from tether.recipes.run_settings import connect_run, open_sampled_run
from tether.renderers import Renderer, renderer_for_model
from tether.types.data import ModelInput, SamplingParams
from tether.types.errors import ServerError, UserInputError

log = logging.getLogger("tether.recipes.rl")


class Config(grpo.Config):
    """Settings of an asynchronous off-policy RL run (GRPO's, plus the staleness bound)."""

    log_dir: Path = Field(
        Path("runs/rl"), description="Where metrics.jsonl, config.json, checkpoints.jsonl and rollouts/ go."
    )
    max_steps_off_policy: int = Field(
        2,
        ge=0,
        description="Most optimizer steps a group's sampling weights may lag the step that trains it"
        " (0: synchronous on-policy).",
    )
    stale_groups: StalePolicy = Field(
        "wait",
        description="wait: train groups in the order they started, waiting for slow ones (never beyond the"
        " bound); drop: train groups as they finish and drop those that finish beyond the bound.",
    )


@dataclass
class RLResult:
    training_client: Any
    renderer: Renderer
    steps_run: int
    final_state_path: str | None
    final_accuracy: float | None
    metrics: list[dict[str, Any]] = field(default_factory=list)


def group_sampler(
    config: Config, renderer: Renderer, source: ProblemSource
) -> Callable[[Any, int, int], RolloutGroup]:
    """`sample(sampling_client, index, version)`: prompt `index`'s group, rewarded (blocking)."""
    stop = renderer.get_stop_sequences()

    def sample(sampling_client: Any, index: int, version: int) -> RolloutGroup:
        problem = source.train_problem(index)
        prompt = renderer.build_generation_prompt(problem.messages)
        sdk = SdkTypes(sampling_client)
        params = SamplingParams(
            max_tokens=config.max_tokens,
            temperature=config.temperature,
            stop=stop,
            seed=(config.seed * 1_000_003 + index * 1_009) % (2**31),
        )
        response = sampling_client.sample(
            sdk.model_input(prompt), config.group_size, sdk.sampling_params(params)
        ).result()
        samples = []
        for sequence in response.sequences:
            if not sequence.tokens:
                continue
            if sequence.logprobs is None:
                raise ServerError("the sampler returned no logprobs for the sampled tokens")
            reward = exact_answer_reward(*renderer.parse_response(sequence.tokens), problem.answer)
            samples.append(Sample(list(sequence.tokens), [float(x) for x in sequence.logprobs], reward))
        return RolloutGroup(index=index, version=version, prompt_tokens=prompt.to_ints(), samples=samples)

    return sample


def _rollouts(config: Config, groups: list[RolloutGroup]) -> tuple[list[grpo.Rollout], dict[str, float]]:
    """Training datums (advantage = reward - group mean, sampler logprobs for the IS correction)."""
    rollouts: list[grpo.Rollout] = []
    rewards: list[float] = []
    constant = 0
    for group in groups:
        if not group.samples:
            continue
        group_rewards = [s.reward for s in group.samples]
        rewards += group_rewards
        is_constant = max(group_rewards) == min(group_rewards)
        constant += is_constant
        prompt = ModelInput.from_ints(group.prompt_tokens)
        for sample, advantage in zip(group.samples, group_advantages(group_rewards), strict=True):
            rollouts.append(
                grpo.Rollout(
                    datum=rl_datum(prompt, sample.tokens, sample.logprobs, advantage),
                    sampler_logprobs=sample.logprobs,
                    prompt_length=prompt.length,
                    group_trains=not (is_constant and config.remove_constant_reward_groups),
                )
            )
    metrics = {
        "reward/mean": sum(rewards) / len(rewards) if rewards else float("nan"),
        "by_group/frac_constant": constant / max(1, len(groups)),
        "num_samples": float(len(rollouts)),
    }
    return rollouts, metrics


def _staleness(step: int, groups: list[RolloutGroup], dropped: int) -> dict[str, Any]:
    lags = [step - g.version for g in groups]
    return {
        "async/staleness_min": float(min(lags)),
        "async/staleness_mean": sum(lags) / len(lags),
        "async/staleness_max": float(max(lags)),
        "async/dropped_groups": float(dropped),
        "async/groups": [[g.index, g.version] for g in groups],
    }


def _save_pending(run_log: RunLog, next_step: int, state: dict[str, Any]) -> str:
    """Write the queue's state beside the checkpoint (atomically); returns its path relative to log_dir."""
    folder = run_log.log_dir / "rollouts"
    folder.mkdir(exist_ok=True)
    name = f"rollouts/pending-{next_step:06d}.json"
    tmp = run_log.log_dir / f"{name}.tmp"
    with tmp.open("w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(run_log.log_dir / name)
    return name


def _load_pending(log_dir: Path, name: str | None) -> dict[str, Any]:
    if name is None:
        raise UserInputError(
            f"{log_dir} holds a checkpoint without its rollout queue; use a new log_dir", field="resume"
        )
    try:
        return json.loads((log_dir / name).read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(
            f"cannot read the saved rollout queue {log_dir / name}: {exc}", field="resume"
        ) from None


def train_rl(
    config: Config,
    service: Any,
    source: ProblemSource,
    *,
    training_client: Any = None,
    on_step_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> RLResult:
    """Run (or resume) asynchronous RL with an existing service client."""
    queue_state: dict[str, Any] | None = None

    def restore_queue(checkpoint: CheckpointRecord) -> None:
        nonlocal queue_state
        queue_state = _load_pending(config.log_dir, checkpoint.extra.get("rollouts"))
        if queue_state.get("batch_size") != config.batch_size:
            raise UserInputError(
                f"{config.log_dir} holds a run with another batch_size; use a new log_dir", field="resume"
            )
        log.info("resuming with %d sampled groups", len(queue_state["groups"]))

    run = open_sampled_run(config, service, training_client, before_resume=restore_queue)
    run_log, training_client, start_step, checkpoint = (
        run.run_log,
        run.training_client,
        run.start_step,
        run.checkpoint,
    )

    renderer = renderer_for_model(config.model_name, training_client.get_tokenizer(), config.renderer_name)
    heldout = source.heldout_problems()
    queue = AsyncRollouts(
        group_sampler(config, renderer, source),
        batch_size=config.batch_size,
        max_steps_off_policy=config.max_steps_off_policy,
        policy=config.stale_groups,
        state=queue_state,
    )
    final_state_path = checkpoint.state_path if checkpoint is not None else None
    final_accuracy: float | None = None
    bar = progress_bar(total=config.num_steps, initial=start_step, desc="RL", enabled=config.progress)
    try:
        if start_step < config.num_steps:  # (a finished run samples nothing)
            sampling_client = training_client.save_weights_and_get_sampling_client().result()
            queue.publish(sampling_client, start_step)
        for step in range(start_step, config.num_steps):
            metrics: dict[str, Any] = {}
            if config.eval_every and heldout and step % config.eval_every == 0:
                metrics["test/accuracy"] = heldout_accuracy(
                    sampling_client, renderer, heldout, config.max_tokens
                )
            groups, dropped = queue.take_batch(step)
            metrics.update(queue.stats())
            metrics.update(_staleness(step, groups, dropped))
            rollouts, rollout_metrics = _rollouts(config, groups)
            metrics.update(rollout_metrics)
            # The step's update, then new sampler weights, are enqueued together; the queue gets
            # the weights as soon as they exist, before the step's metrics are even read.
            train_metrics = _TrainStep(config, training_client, rollouts)
            sampling_client = training_client.save_weights_and_get_sampling_client().result()
            queue.publish(sampling_client, step + 1)
            metrics.update(train_metrics.result())
            next_step = step + 1
            if next_step == config.num_steps and config.eval_every and heldout:
                final_accuracy = heldout_accuracy(sampling_client, renderer, heldout, config.max_tokens)
                metrics["test/final_accuracy"] = final_accuracy
            if on_step_end is not None:
                on_step_end(step, metrics)
            # Log before saving: a crash in between leaves a row that resume truncates, never a gap.
            run_log.log_metrics(step, metrics)
            if next_step == config.num_steps or (config.save_every and next_step % config.save_every == 0):
                name = f"rl-{next_step:06d}"
                state_future = training_client.save_state(name)
                pending = _save_pending(
                    run_log, next_step, {**queue.snapshot(), "batch_size": config.batch_size}
                )
                final_state_path = state_future.result().path
                run_log.record_checkpoint(
                    CheckpointRecord(
                        name=name,
                        next_step=next_step,
                        state_path=final_state_path,
                        extra={"rollouts": pending},
                    )
                )
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics['reward/mean']:.2f}", lag=f"{metrics['async/staleness_mean']:.1f}"
            )
    finally:
        queue.close()
        bar.close()
        run_log.close()
    return RLResult(
        training_client,
        renderer,
        config.num_steps - start_step,
        final_state_path,
        final_accuracy,
        run_log.metrics(),
    )


class _TrainStep:
    """GRPO's update on the groups that carry signal, enqueued now, its metrics read by `result()`."""

    def __init__(self, config: Config, training_client: Any, rollouts: list[grpo.Rollout]) -> None:
        self._config, self._client, self._rollouts = config, training_client, rollouts
        self._trained = [r for r in rollouts if r.group_trains]
        self._futures: tuple[Any, Any] | None = None
        if self._trained:
            sdk = SdkTypes(training_client)
            self._futures = (
                training_client.forward_backward(
                    sdk.data([r.datum for r in self._trained]), config.loss_fn, grpo.loss_fn_config(config)
                ),
                training_client.optim_step(sdk.adam_params(config.learning_rate)),
            )

    def result(self) -> dict[str, float]:
        if self._futures is None:  # nothing to learn from: measure the lag without moving the weights
            return grpo.train_step(self._config, self._client, self._rollouts) if self._rollouts else {}
        output = self._futures[0].result()
        optim_metrics = self._futures[1].result().metrics or {}
        metrics = grpo.sampler_trainer_kl(self._trained, output)
        metrics["num_trained_samples"] = float(len(self._trained))
        metrics["learning_rate"] = self._config.learning_rate
        metrics.update({f"optim/{k}": v for k, v in optim_metrics.items()})
        return metrics


def main(config: Config) -> RLResult:
    """`tether rl`: connect and train asynchronously on the configured environment or dataset."""
    source = grpo.problem_source(config)
    service = connect_run(config)
    try:
        return train_rl(config, service, source)
    finally:
        service.close()
