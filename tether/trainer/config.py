"""Typed settings of a trainer: the engine settings `tether serve` shares, and `tether trainer`'s own.

`tether serve` and `tether trainer` both take `EngineSettings`' fields (the CLI is generated from
these models by `tether.cli_args`), so each setting is documented once, here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


def default_data_dir() -> Path:
    """`$TETHER_DATA_DIR`, else the XDG data home (`~/.local/share/tether`)."""
    explicit = os.environ.get("TETHER_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "tether"


class EngineSettings(BaseModel):
    """How a base model is loaded and run, and where its checkpoints live."""

    model_aliases: dict[str, str] = Field(
        default_factory=dict,
        description="Map from a model name clients use to a local Hugging Face directory.",
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Directory for the state database and checkpoints ($TETHER_DATA_DIR, else ~/.local/share/tether).",
    )
    device: str = Field(
        "auto",
        description='Device for the models: "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...',
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description='Weight dtype of the base models; "auto": bfloat16 on a GPU, float32 on a CPU.'
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads torch may use for one operation (unset: torch's default, one per core). "
        "On a CPU shared with other work, fewer threads keep them from waiting on each other "
        "(or set OMP_WAIT_POLICY=PASSIVE in the environment, so waiting threads sleep instead of spinning).",
    )
    max_tokens_per_micro_batch: int = Field(
        8192, ge=1, description="Token budget of one forward/backward micro-batch in the training engine."
    )
    fuse_lora_ops: bool = Field(
        True,
        description="Run the forward/forward_backward ops that several LoRA models have ready at once as one "
        "batched pass (each model's results as if run alone); off: one op at a time.",
    )
    fuse_wait_ms: float = Field(
        5.0,
        ge=0,
        description="With fuse_lora_ops: how long a LoRA model's forward_backward that would run alone may wait "
        "for other recently active models' next ones to join it (0: never wait).",
    )
    nproc_per_node: int = Field(
        1,
        ge=1,
        description="Ranks of one base model's trainer on this machine (started with torchrun; on GPUs one "
        "per GPU). Above 1 the trainer shards its models with FSDP2; `tether serve` needs --trainer-process.",
    )
    collective_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Multi-rank trainers: seconds a rank waits in a training collective before it "
        "gives up (and the trainer stops) instead of hanging.",
    )
    mixed_precision: Literal["none", "bfloat16"] = Field(
        "none",
        description='Multi-rank trainers: "bfloat16" computes in bf16 with fp32 gradient reduction (FSDP2 '
        'MixedPrecisionPolicy); "none" computes in the weights\' dtype. Either way bf16/fp16 weights are '
        "stepped through sharded fp32 master copies and fp32 optimizer moments.",
    )
    on_nonfinite: Literal["refuse", "skip"] = Field(
        "refuse",
        description="An optimizer step whose gradients or update would make weights or optimizer moments NaN or "
        'infinite: "refuse" fails the optim_step with a user error (weights and moments unchanged); "skip" '
        "skips it, answers its metrics with skipped_nonfinite:sum = 1 and lets training go on.",
    )
    forward_only: bool = Field(
        False,
        description="A frozen reference trainer: forward passes (logprobs) and sampling only; training models "
        "are the base model (a LoRA adapter disabled) or loaded weights, with no gradients and no optimizer "
        "state, and forward_backward, optim_step and saves are refused (400).",
    )
    kv_cache_budget_tokens: int = Field(
        65536, ge=1, description="Tokens of KV cache the sampling engine may hold per base model."
    )

    def engine_settings(self) -> EngineSettings:
        """Just the engine settings (for handing to a trainer)."""
        return EngineSettings(**{name: getattr(self, name) for name in EngineSettings.model_fields})


class TrainerConfig(EngineSettings):
    """Everything an operator can choose about one `tether trainer` process (one base model)."""

    base_model: str = Field(
        description="The base model this trainer loads: a name, alias, hub id or local directory."
    )
    host: str = Field("127.0.0.1", description="Interface the op socket listens on.")
    port: int = Field(0, ge=0, le=65535, description="TCP port of the op socket; 0 picks a free port.")
    ready_file: Path | None = Field(
        None, description="Once listening, write `host:port` into this file (the server waits for it)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
