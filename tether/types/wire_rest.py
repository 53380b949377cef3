"""Pydantic models of the Tinker REST catalogue bodies (tinker-protocol.md §3.5): training runs,
checkpoints, weights info, sessions. Required fields match the official SDK's response models,
which validate strictly; `tether.types.wire` re-exports everything here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, StrictFloat, StrictInt

from tether.types.wire_base import MAX_INT64, Int64, NonNegativeInt, TtlSeconds, WireModel

__all__ = [
    "Cursor",
    "Checkpoint",
    "CheckpointsListResponse",
    "TrainingRun",
    "TrainingRunsResponse",
    "WeightsInfoRequest",
    "WeightsInfoResponse",
    "CopyWeightsRequest",
    "CopyWeightsResponse",
    "ListSessionsResponse",
    "GetSessionResponse",
    "SetCheckpointTtlRequest",
    "AssignSessionProjectRequest",
    "ExternalWeightsUrlsResponse",
    "SessionTraceExportResponse",
    "ErrorResponse",
]


class Cursor(WireModel):
    offset: int
    limit: int
    total_count: int


class Checkpoint(WireModel):
    checkpoint_id: str
    """`<segment>/<name>`, e.g. `weights/step_100`."""
    checkpoint_type: Literal["training", "sampler", "external"]
    time: datetime
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None


class CheckpointsListResponse(WireModel):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class TrainingRun(WireModel):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsResponse(WireModel):
    training_runs: list[TrainingRun]
    cursor: Cursor


class WeightsInfoRequest(WireModel):
    tinker_path: str


class WeightsInfoResponse(WireModel):
    base_model: str
    is_lora: bool
    optimizer_config: dict[str, object] = Field(default_factory=lambda: dict[str, object](type="adamw"))
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


class CopyWeightsRequest(WireModel):
    source_path: str
    session_id: str | None = None
    model_seq_id: Int64 | None = None
    destination_project_id: str | None = None
    ttl_seconds: TtlSeconds | None = None
    weights_access_token: str | None = None


class CopyWeightsResponse(WireModel):
    tinker_path: str


class ListSessionsResponse(WireModel):
    sessions: list[str]


class GetSessionResponse(WireModel):
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, str] | None = None
    display_name: str | None = None


class TokenizerFile(WireModel):
    name: str
    size: int
    sha256: str


class TokenizerFilesResponse(WireModel):
    """`GET /api/v1/tether/tokenizer/{base_model}/files`: the tokenizer files a remote client fetches."""

    base_model: str
    files: list[TokenizerFile]
    digest: str
    """sha256 over the files' names and digests: the cache key of this tokenizer."""


class LogMetricsRequest(WireModel):
    """Body of `POST /api/v1/tether/runs/{run_id}/metrics` (tether's `TrainingClient.log_metrics`)."""

    metrics: dict[str, StrictFloat | Annotated[StrictInt, Field(ge=-MAX_INT64 - 1, le=MAX_INT64)]]
    step: NonNegativeInt | None = None
    """The client's step; None: the run's current optimizer step as the server counts them."""


class SetCheckpointTtlRequest(WireModel):
    """`PUT .../checkpoints/{id}/ttl`; None removes the expiry."""

    ttl_seconds: TtlSeconds | None = None


class AssignSessionProjectRequest(WireModel):
    project_id: str


class ExternalWeightsUrlsResponse(WireModel):
    urls: dict[str, str]
    """Relative file path → URL the client downloads with a plain GET."""
    expires: datetime


class SessionTraceExportResponse(WireModel):
    status: Literal["pending", "ready", "failed"]
    url: str | None = None
    error: str | None = None


class ErrorResponse(WireModel):
    """Every 4xx/5xx JSON body (never an empty 400: the SDK reads that as a Cloudflare reset)."""

    detail: str
    error_type: str | None = None
    """tether's error class name (`UserInputError`, ...), so tether's SDK can re-raise the same type."""
    field: str | None = None
    datum_index: int | None = None
