"""Settings every resumable recipe shares: how it reaches its server and how its run is kept.

`sft.Config` and `grpo.Config` extend `RunSettings`, so these options read the same in every
recipe's `--help`, and `connect_run` is the one place that decides where an embedded server keeps
its checkpoints (inside the run's log_dir, so a resumed run finds them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tether.recipes.clients import SdkName, connect


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


def connect_run(settings: RunSettings) -> Any:
    """A service client for the run; an embedded server keeps its data in `<log_dir>/local-server`."""
    return connect(
        settings.base_url, settings.api_key, sdk=settings.sdk, local_data_dir=settings.log_dir / "local-server"
    )
