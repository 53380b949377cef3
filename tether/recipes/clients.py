"""Connecting a recipe to a server, through the SDK only (so any Tinker-compatible server works).

`base_url="local"` starts tether's embedded server in a child process. A recipe can also be handed
an existing service client (the quickstart and tests share one between SFT and GRPO).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from tether.client.service_client import ServiceClient
from tether.types.errors import UserInputError

SdkName = Literal["tether", "tinker"]


def connect(
    base_url: str | None,
    api_key: str | None = None,
    *,
    sdk: SdkName = "tether",
    local_data_dir: Path | None = None,
) -> Any:
    """A service client for `base_url` (None: $TETHER_BASE_URL / $TINKER_BASE_URL; "local": embedded).

    The embedded server keeps its checkpoints in `local_data_dir` (a temporary directory if None):
    a recipe that can resume passes a directory inside its log_dir, so that the checkpoints a
    resumed run reads outlive the process that wrote them.

    `sdk="tinker"` drives the run with the official tinker SDK instead, against any
    Tinker-compatible server (for tether's embedded server use tether's SDK).
    """
    if sdk == "tether":
        return ServiceClient(base_url=base_url, api_key=api_key, local_data_dir=local_data_dir)
    if base_url == "local":
        raise UserInputError(
            "the embedded server ('local') is started by tether's SDK; use sdk='tether'", field="sdk"
        )
    try:
        import tinker
    except ImportError:
        raise UserInputError(
            "sdk='tinker' needs the tinker package (pip install tinker)", field="sdk"
        ) from None
    return tinker.ServiceClient(base_url=base_url, api_key=api_key)


def new_training_client(service: Any, model_name: str, lora_rank: int, seed: int | None) -> Any:
    """A fresh trainable model: LoRA of `lora_rank`, or full fine-tuning when it is 0."""
    return service.create_lora_training_client(base_model=model_name, rank=lora_rank, seed=seed).result()


def resume_training_client(service: Any, state_path: str) -> Any:
    """A trainable model restored from a `save_state` checkpoint, weights and optimizer state."""
    return service.create_training_client_from_state_with_optimizer(state_path).result()
