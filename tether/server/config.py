"""Typed settings of `tether serve`.

The command line (`tether serve --help`) and the environment (`TETHER_<FIELD>`) are generated from
this one model by `tether.cli_args`, so a setting is documented once, here, under its field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from tether.engine.default_model import DEFAULT_MODEL_NAME
from tether.jobs.config import JobSettings
from tether.trainer.config import EngineSettings, default_data_dir

__all__ = ["ServerConfig", "default_data_dir"]


class ServerConfig(EngineSettings, JobSettings):
    """Everything an operator can choose about one `tether serve` process (trainer jobs: JobSettings)."""

    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 exposes the server).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on; 0 picks a free port.")
    models: list[str] = Field(
        default_factory=lambda: [DEFAULT_MODEL_NAME],
        description="Base models served: names (aliases, Hugging Face ids) or local directories.",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description=(
            "Accepted API keys (each must start with tml-). Empty: any key starting with tml- is "
            "accepted and all such keys act as one owner (single-user mode)."
        ),
    )
    max_pending_samples: int = Field(
        256,
        ge=1,
        description="Samples (num_samples summed) pending per base model before asample answers 429 (back-pressure).",
    )
    stability_record_max_tokens: int = Field(
        1 << 24,
        ge=0,
        description="Tokens (prompts plus sampled tokens) of the sequences kept for stable_reinforce "
        "(sampled with record_stability_info=true); beyond it the least recently used are dropped, and "
        "training on a dropped sequence is refused naming it. Records also expire a day after last use.",
    )
    max_samplers_per_model: int = Field(
        4,
        ge=1,
        description="Sampling clients a training model keeps from save_weights_and_get_sampling_client; a newer "
        "one releases the oldest's frozen weights (memory stays flat over an RL run), and using a released one "
        "answers 404 saying so.",
    )
    session_timeout_s: float = Field(
        120.0,
        gt=0,
        description="A session that sends no heartbeat for this long is expired and its models are freed.",
    )
    custom_loss_graph_ttl_s: float = Field(
        120.0,
        gt=0,
        description="Seconds a kept forward graph waits for its backward before it is freed.",
    )
    long_poll_s: float = Field(
        25.0, gt=0, le=40, description="How long retrieve_future holds a request before answering try_again."
    )
    fwdbwd_max_chunk_len: int | None = Field(
        None,
        ge=1,
        description=(
            "Datums per forward_backward request the Tinker SDK sends (it splits larger calls into chunks "
            "sent in parallel); unset keeps the SDK's default (1024)."
        ),
    )
    metrics_points_per_series: int = Field(
        2000,
        ge=16,
        description="Points kept per metric series of a run (console curves, /metrics JSON); beyond it, "
        "neighbouring steps are averaged into one point and the series' resolution halves.",
    )
    max_request_body_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024 * 1024,
        description="Largest request body accepted (bytes, as sent); a longer one is answered 413 as soon as "
        "it streams past this. The Tinker SDK sends forward_backward in chunks of about 5 MB.",
    )
    max_decoded_body_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024 * 1024,
        description="Largest size a request may expand to once decoded: a zstd body's decompressed bytes, "
        "and the bytes the sparse tensors of one forward_backward densify to.",
    )
    idempotency_key_ttl_s: float = Field(
        24 * 3600.0,
        gt=0,
        description="How long a create-model or copy-weights idempotency key is kept: a retry within this "
        "window gets the first answer; older keys are pruned (a live model's key is kept while it lives).",
    )
    maintenance_interval_s: float = Field(
        5.0, gt=0, description="How often expired sessions and checkpoints are looked for and freed."
    )
    ready_file: Path | None = Field(
        None, description="Once listening, write the base URL into this file (used by the SDK's local mode)."
    )
    trainer_addresses: dict[str, str] = Field(
        default_factory=dict,
        description="Map from a served base model to the `host:port` of a `tether trainer` already running for it "
        "(e.g. a multi-node torchrun job); ops for that model go there instead of to a trainer this server starts.",
    )
    trainer_process: bool = Field(
        False,
        description="Run each base model's trainer in its own `tether trainer` process (ops cross a local "
        "socket) instead of in this process.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of the server and uvicorn."
    )

    @field_validator("models")
    @classmethod
    def _serves_something(cls, models: list[str]) -> list[str]:
        if not models:
            raise ValueError("serve at least one model")
        return models

    @field_validator("api_keys")
    @classmethod
    def _keys_have_prefix(cls, keys: list[str]) -> list[str]:
        bad = [k for k in keys if not k.startswith("tml-")]
        if bad:
            raise ValueError("every API key must start with 'tml-' (the Tinker SDK refuses others)")
        return keys
