"""Supervised fine-tuning on chat conversations: the `tether sft` recipe.

One step = one `forward_backward` with `cross_entropy` on a batch of conversations, then one
`optim_step` at the scheduled learning rate. Held-out NLL is measured every `eval_every` steps
(before the step, on the weights the step starts from), the full state is saved every
`save_every` steps, and a rerun with the same `log_dir` resumes from the last checkpoint with
exactly the next batch (see `run_log` for why no batch is replayed or skipped).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from tether.recipes.batching import BatchPlan
from tether.recipes.clients import new_training_client, resume_training_client
from tether.recipes.compat import SdkTypes
from tether.recipes.conversations import conversation_datum, load_conversations
from tether.recipes.progress import progress_bar
from tether.recipes.run_log import CheckpointRecord, RunLog
from tether.recipes.run_settings import RunSettings, connect_run
from tether.recipes.schedules import LrSchedule, lr_multiplier
from tether.renderers import Message, Renderer, TrainOnWhat, renderer_for_model
from tether.types.data import Datum
from tether.types.errors import UserInputError

log = logging.getLogger("tether.recipes.sft")


class Config(RunSettings):
    """Settings of an SFT run."""

    dataset_path: Path | None = Field(
        None,
        description='JSONL file of conversations, one {"messages": [{"role", "content"}, ...]} per line.',
    )
    eval_dataset_path: Path | None = Field(
        None,
        description="JSONL file of held-out conversations; if unset, `test_size` rows of the dataset are held out.",
    )
    test_size: int = Field(
        0, ge=0, description="Rows of the dataset held out for the NLL evaluation when no eval file is given."
    )
    log_dir: Path = Field(
        Path("runs/sft"), description="Where metrics.jsonl, config.json and checkpoints.jsonl go."
    )
    model_name: str = Field(
        "tether/tiny-qwen3", description="Base model to fine-tune, as the server names it."
    )
    renderer_name: str | None = Field(
        None, description="Chat format; unset: chosen from the model name and tokenizer."
    )
    train_on_what: TrainOnWhat = Field(
        TrainOnWhat.ALL_ASSISTANT_MESSAGES, description="Which tokens carry loss."
    )
    lora_rank: int = Field(32, ge=0, description="LoRA rank; 0 trains all weights (full fine-tuning).")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate of AdamW.")
    lr_schedule: LrSchedule = Field(
        "linear", description="Decay after warmup: constant, linear or cosine (to 0)."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup from 0 to the peak learning rate.")
    batch_size: int = Field(32, ge=1, description="Conversations per optimizer step.")
    num_epochs: int = Field(1, ge=1, description="Passes over the training conversations.")
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Stop after this many steps in total; the learning-rate schedule still spans all epochs (unset: run them all).",
    )
    max_length: int | None = Field(
        2048, ge=2, description="Tokens kept per conversation (the start is kept)."
    )
    eval_every: int | None = Field(10, ge=1, description="Held-out NLL every this many steps (unset: never).")
    save_every: int | None = Field(
        20,
        ge=1,
        description="Checkpoint (weights + optimizer) every this many steps (unset: only at the end).",
    )
    seed: int = Field(0, description="Seed of the data order and of new LoRA weights.")


@dataclass
class SFTResult:
    training_client: Any
    renderer: Renderer
    steps_run: int
    final_state_path: str | None
    metrics: list[dict[str, Any]] = field(default_factory=list)


def _datums(
    renderer: Renderer, conversations: Sequence[list[Message]], config: Config, reduction: str
) -> list[Datum]:
    datums = []
    for index, conversation in enumerate(conversations):
        try:
            datums.append(
                conversation_datum(
                    renderer, conversation, config.train_on_what, config.max_length, reduction=reduction
                )
            )
        except UserInputError as exc:
            raise UserInputError(exc.message, field=exc.field or "dataset_path", datum_index=index) from None
    return datums


def weighted_nll(datums: Sequence[Datum], outputs: Sequence[dict[str, Any]]) -> tuple[float, int]:
    """Mean NLL per trained token (weights > 0) and the number of such tokens."""
    total, count = 0.0, 0
    for datum, output in zip(datums, outputs, strict=True):
        mask = np.asarray(datum.loss_fn_inputs["weights"].tolist(), dtype=np.float64) > 0
        logprobs = np.asarray(output["logprobs"].tolist(), dtype=np.float64)
        total -= float(logprobs[mask].sum())
        count += int(mask.sum())
    return (total / count if count else float("nan")), count


def _plan_fingerprint(plan: BatchPlan) -> dict[str, int]:
    return {
        "num_examples": plan.num_examples,
        "batch_size": plan.batch_size,
        "num_epochs": plan.num_epochs,
        "seed": plan.seed,
    }


def split_conversations(
    config: Config, conversations: list[list[Message]]
) -> tuple[list[list[Message]], list[list[Message]]]:
    """(train, held-out): the eval file if one is configured, else `test_size` rows drawn with `seed`."""
    if config.eval_dataset_path is not None:
        return conversations, load_conversations(config.eval_dataset_path, field="eval_dataset_path")
    if config.test_size >= len(conversations):
        raise UserInputError(
            f"is {config.test_size} but the dataset has {len(conversations)} rows", field="test_size"
        )
    order = list(range(len(conversations)))
    random.Random(f"split:{config.seed}").shuffle(order)
    held = set(order[: config.test_size])
    return [c for i, c in enumerate(conversations) if i not in held], [conversations[i] for i in sorted(held)]


def train_sft(
    config: Config,
    service: Any,
    train_conversations: Sequence[list[Message]],
    eval_conversations: Sequence[list[Message]] = (),
    *,
    training_client: Any = None,
    on_step_end: Callable[[int, dict[str, Any]], None] | None = None,
    stop_after: Callable[[int, dict[str, Any]], bool] | None = None,
) -> SFTResult:
    """Run (or resume) SFT with an existing service client. `training_client` continues a model in
    hand instead of creating one; `on_step_end(step, metrics)` may add metrics before they are logged;
    `stop_after(step, metrics)` returning True ends the run after that step (its state is saved, as at
    the planned end), e.g. an early stop on a validation measurement."""
    run_log = RunLog(config.log_dir, wandb_project=config.wandb_project, wandb_name=config.wandb_name)
    run_log.write_config(config)
    plan = BatchPlan(len(train_conversations), config.batch_size, config.num_epochs, config.seed)
    # max_steps ends the run early without stretching or shrinking the schedule (as in the cookbook).
    total_steps = min(plan.total_steps, config.max_steps or plan.total_steps)

    start_step = 0
    checkpoint = run_log.last_checkpoint() if config.resume else None
    if checkpoint is not None:
        if checkpoint.extra.get("plan") != _plan_fingerprint(plan):
            raise UserInputError(
                f"{config.log_dir} holds a run with a different dataset or batching; use a new log_dir or resume=false",
                field="resume",
            )
        training_client = resume_training_client(service, checkpoint.state_path)
        start_step = checkpoint.next_step
        run_log.truncate_metrics(start_step)
        log.info("resuming from %s at step %d", checkpoint.state_path, start_step)
    elif training_client is None:
        training_client = new_training_client(service, config.model_name, config.lora_rank, config.seed)

    sdk = SdkTypes(training_client)
    tokenizer = training_client.get_tokenizer()
    renderer = renderer_for_model(config.model_name, tokenizer, config.renderer_name)
    train_datums = _datums(renderer, train_conversations, config, "mean")
    eval_datums = _datums(renderer, eval_conversations, config, "none")

    final_state_path = checkpoint.state_path if checkpoint is not None else None
    steps_run = 0
    bar = progress_bar(total=total_steps, initial=start_step, desc="SFT", enabled=config.progress)
    for step in range(start_step, total_steps):
        metrics: dict[str, Any] = {"epoch": plan.epoch_of(step)}
        if eval_datums and config.eval_every and step % config.eval_every == 0:
            outputs = training_client.forward(sdk.data(eval_datums), "cross_entropy").result().loss_fn_outputs
            metrics["test/nll"], _ = weighted_nll(eval_datums, outputs)
        learning_rate = config.learning_rate * lr_multiplier(
            config.lr_schedule, step, plan.total_steps, config.warmup_steps
        )
        batch = [train_datums[i] for i in plan.indices(step)]
        backward = training_client.forward_backward(sdk.data(batch), "cross_entropy")
        optim = training_client.optim_step(sdk.adam_params(learning_rate))
        output = backward.result()
        optim_metrics = optim.result().metrics or {}
        metrics["train_mean_nll"], metrics["num_loss_tokens"] = weighted_nll(batch, output.loss_fn_outputs)
        metrics["learning_rate"] = learning_rate
        metrics.update({f"optim/{k}": v for k, v in optim_metrics.items()})
        if on_step_end is not None:
            on_step_end(step, metrics)
        # Log before saving: a crash in between leaves a row that resume truncates, never a gap.
        run_log.log_metrics(step, metrics, training_client=training_client)
        next_step = step + 1
        steps_run += 1
        stop = stop_after is not None and stop_after(step, metrics)
        if stop or next_step == total_steps or (config.save_every and next_step % config.save_every == 0):
            final_state_path = _save(training_client, run_log, next_step, plan)
        bar.update(1)
        bar.set_postfix(nll=f"{metrics['train_mean_nll']:.3f}")
        if stop:
            break
    bar.close()
    run_log.close()
    return SFTResult(training_client, renderer, steps_run, final_state_path, run_log.metrics())


def _save(training_client: Any, run_log: RunLog, next_step: int, plan: BatchPlan) -> str:
    name = f"sft-{next_step:06d}"
    state_path = training_client.save_state(name).result().path
    run_log.record_checkpoint(
        CheckpointRecord(
            name=name, next_step=next_step, state_path=state_path, extra={"plan": _plan_fingerprint(plan)}
        )
    )
    return state_path


def main(config: Config) -> SFTResult:
    """`tether sft`: load the JSONL data, connect, train."""
    if config.dataset_path is None:
        raise UserInputError("is required", field="dataset_path")
    train, held_out = split_conversations(config, load_conversations(config.dataset_path))
    service = connect_run(config)
    try:
        return train_sft(config, service, train, held_out)
    finally:
        service.close()
