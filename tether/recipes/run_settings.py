"""Settings every resumable recipe shares: how it reaches its server and how its run is kept.

`sft.Config` and `grpo.Config` extend `RunSettings`, so these options read the same in every
recipe's `--help`, and `connect_run` is the one place that decides where an embedded server keeps
its checkpoints (inside the run's log_dir, so a resumed run finds them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tether.recipes.clients import SdkName, connect, new_training_client, resume_training_client
from tether.recipes.run_log import CheckpointRecord, RunLog

log = logging.getLogger("tether.recipes")


class RunSettings(BaseModel):
    """Server connection, resume, progress and logging settings of a recipe run."""

    model_config = ConfigDict(extra="forbid")

    log_dir: Path = Field(
        Path("runs"), description="Where metrics.jsonl, config.json and checkpoints.jsonl go."
    )
    base_url: str | None = Field(
        None,
        description='Server URL; "local" starts an embedded tether server; unset: $TETHER_BASE_URL, then $TINKER_BASE_URL.',
    )
    api_key: str | None = Field(None, description="API key; unset: $TETHER_API_KEY, then $TINKER_API_KEY.")
    sdk: SdkName = Field(
        "tether", description="Client library: tether's SDK, or the official tinker SDK (pip install tinker)."
    )
    resume: bool = Field(True, description="Continue from the last checkpoint in log_dir if there is one.")
    progress: bool = Field(True, description="Show a progress bar.")
    wandb_project: str | None = Field(
        None, description="Also log to this Weights & Biases project (needs wandb installed)."
    )
    wandb_name: str | None = Field(None, description="Weights & Biases run name.")


class SampledRunSettings(RunSettings):
    """What every recipe that samples prompts, trains a model and checkpoints it has in common (GRPO,
    asynchronous RL, distillation); each recipe adds its own fields and documents the ones it reads
    differently (dataset rows, held-out metric, group, temperature)."""

    env: Literal["addition"] = Field(
        "addition", description="Built-in prompt environment, used when no dataset_path is given."
    )
    num_operands: int = Field(
        4, ge=2, le=9, description="Numbers added per problem in the addition environment."
    )
    num_digits: int = Field(1, ge=1, le=6, description="Digits per number in the addition environment.")
    model_name: str = Field("tether/tiny-qwen3", description="Base model, as the server names it.")
    renderer_name: str | None = Field(
        None, description="Chat format; unset: chosen from the model name and tokenizer."
    )
    lora_rank: int = Field(32, ge=0, description="LoRA rank; 0 trains all weights (full fine-tuning).")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate (constant).")
    batch_size: int = Field(16, ge=1, description="Prompts per step.")
    num_steps: int = Field(20, ge=1, description="Optimizer steps in total.")
    max_tokens: int = Field(16, ge=1, description="Most tokens sampled per answer.")
    save_every: int | None = Field(
        20, ge=1, description="Checkpoint every this many steps (unset: only at the end)."
    )
    seed: int = Field(0, description="Seed of prompts, sampling and new LoRA weights.")


def connect_run(settings: RunSettings) -> Any:
    """A service client for the run; an embedded server keeps its data in `<log_dir>/local-server`."""
    return connect(
        settings.base_url,
        settings.api_key,
        sdk=settings.sdk,
        local_data_dir=settings.log_dir / "local-server",
    )


@dataclass
class OpenedRun:
    """A run's log and training client, and where it starts (`checkpoint` is the one resumed, if any)."""

    run_log: RunLog
    training_client: Any
    start_step: int
    checkpoint: CheckpointRecord | None


def open_sampled_run(
    config: SampledRunSettings,
    service: Any,
    training_client: Any = None,
    *,
    before_resume: Callable[[CheckpointRecord], None] | None = None,
) -> OpenedRun:
    """Start or resume a run of a recipe that samples and trains: resume from the last checkpoint of
    `config.log_dir` (with `resume`), else continue `training_client`, else start from
    `load_checkpoint_path`, else create a new model. `before_resume` checks (and reads what it needs
    from) the checkpoint before the model is restored; it raises to refuse the resume."""
    run_log = RunLog(config.log_dir, wandb_project=config.wandb_project, wandb_name=config.wandb_name)
    run_log.write_config(config)
    checkpoint = run_log.last_checkpoint() if config.resume else None
    if checkpoint is not None:
        if before_resume is not None:
            before_resume(checkpoint)
        training_client = resume_training_client(service, checkpoint.state_path)
        run_log.truncate_metrics(checkpoint.next_step)
        log.info("resuming from %s at step %d", checkpoint.state_path, checkpoint.next_step)
        return OpenedRun(run_log, training_client, checkpoint.next_step, checkpoint)
    load_path = getattr(config, "load_checkpoint_path", None)
    if training_client is None and load_path:
        training_client = service.create_training_client_from_state(load_path).result()
    elif training_client is None:
        training_client = new_training_client(service, config.model_name, config.lora_rank, config.seed)
    return OpenedRun(run_log, training_client, 0, None)
