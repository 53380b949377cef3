"""Wire models of dedicated trainer jobs: the control plane's `/training/v1/trainerJobs` resource.

Names, fields and states follow the Fireworks training API that hosted users know
(fireworks-training-api.md §2, §3): `TrainerJobConfig` is both what the SDK and the CLI build and the
body `POST /training/v1/trainerJobs` takes; `TrainerJob` is what every job route answers. States are
sent as `JOB_STATE_<NAME>`. Durations are seconds (`"1800s"`, a number or a `timedelta` are accepted
where a user types one). This module is torch-free and knows nothing of processes or HTTP.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime, timedelta
from typing import Any

from pydantic import Field, field_validator

from tether.types.wire_base import MAX_INT64, WireModel

__all__ = [
    "JOB_ID_PATTERN",
    "JobState",
    "TrainerJobConfig",
    "TrainerJob",
    "TrainerJobsResponse",
    "JobCheckpoint",
    "JobCheckpointsResponse",
    "DeleteJobCheckpointRequest",
    "PromoteCheckpointRequest",
    "ExportMergedRequest",
    "ExportedModel",
    "validate_job_id",
    "parse_duration_s",
    "DEFAULT_INACTIVITY_TIMEOUT_S",
    "MAX_INACTIVITY_TIMEOUT_S",
]

JOB_ID_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
"""1-63 characters of `[a-z0-9-]`, starting and ending with a letter or digit (the reference's id rule)."""

DEFAULT_INACTIVITY_TIMEOUT_S = 3600.0
"""60 minutes, the reference's default."""
MAX_INACTIVITY_TIMEOUT_S = 3 * 3600.0
"""Three hours, the reference's maximum."""
MAX_LORA_RANK = 4096
MAX_NODES = 1024
MAX_RANKS_PER_NODE = 1024
MAX_RESTARTS = 1000
"""Bounds of the integer fields (every integer a client sends is bounded; the launchers refuse
what they cannot place with a clearer message long before these)."""


class JobState(enum.StrEnum):
    """A trainer job's state (reference §2.5). Live: CREATING, PENDING, RUNNING. Stopped and
    resumable: FAILED, CANCELLED, COMPLETED. Tombstone: DELETING, DELETED."""

    CREATING = "JOB_STATE_CREATING"
    """The row exists; the launcher has not been asked yet."""
    PENDING = "JOB_STATE_PENDING"
    """Launched; the process is starting or loading its base model."""
    RUNNING = "JOB_STATE_RUNNING"
    """The process serves the Tinker protocol (ready once its healthz also answers 200)."""
    FAILED = "JOB_STATE_FAILED"
    """The launcher or the process failed and no relaunch is allowed; `reason` says why."""
    CANCELLED = "JOB_STATE_CANCELLED"
    """Stopped on request (`:cancel`)."""
    COMPLETED = "JOB_STATE_COMPLETED"
    """Stopped by the platform for inactivity; resumable."""
    DELETING = "JOB_STATE_DELETING"
    DELETED = "JOB_STATE_DELETED"
    """A tombstone: the id cannot be reused; checkpoints stay listable for the retention period."""

    @classmethod
    def parse(cls, value: str) -> JobState:
        """`"RUNNING"` or `"JOB_STATE_RUNNING"` -> JobState.RUNNING (ValueError otherwise)."""
        name = value.upper().removeprefix("JOB_STATE_")
        return cls[name]

    @property
    def short(self) -> str:
        return self.value.removeprefix("JOB_STATE_")


LIVE_STATES = frozenset({JobState.CREATING, JobState.PENDING, JobState.RUNNING})
RESUMABLE_STATES = frozenset({JobState.FAILED, JobState.CANCELLED, JobState.COMPLETED})
TOMBSTONE_STATES = frozenset({JobState.DELETING, JobState.DELETED})


def validate_job_id(job_id: str) -> str:
    """`job_id` if it follows the id rule, else ValueError saying which rule it breaks."""
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.match(job_id):
        raise ValueError(
            f"job id {job_id!r} must be 1-63 characters of lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return job_id


def parse_duration_s(value: Any) -> float | None:
    """Seconds from a number, a `timedelta`, or a string `"1800s"` / `"1800"` (None stays None)."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, str):
        text = value.strip().lower().removesuffix("s")
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected seconds like '1800s', got {value!r}") from None
    return value


class TrainerJobConfig(WireModel):
    """What a user asks for: one base model on its own trainer process (group).

    The body of `POST /training/v1/trainerJobs`; the SDK's `TrainerJobManager.create` and the CLI's
    `tether jobs create` take it too (the CLI options are generated from these fields).
    """

    base_model: str = Field(description="Base model the job's trainer loads (one the control plane allows).")
    lora_rank: int = Field(
        0,
        ge=0,
        le=MAX_LORA_RANK,
        description="Default LoRA rank of the job's training clients; 0 = full-parameter.",
    )
    max_context_length: int | None = Field(
        None, ge=1, le=MAX_INT64, description="Longest sequence (tokens) the job accepts."
    )
    node_count: int = Field(
        1,
        ge=1,
        le=MAX_NODES,
        description="Machines (torchrun nodes) the job spans; the local launcher runs them all on its own "
        "machine, meeting on loopback.",
    )
    nproc_per_node: int = Field(
        1,
        ge=1,
        le=MAX_RANKS_PER_NODE,
        description="Ranks per machine; more than one launches the job under torchrun.",
    )
    display_name: str | None = Field(
        None, max_length=63, description="Human-readable name (< 64 characters)."
    )
    forward_only: bool = Field(
        False,
        description="A frozen reference trainer (DPO/KL references): forward and logprobs (and sampling) "
        "only, no gradients or optimizer state; forward_backward, optim_step and saves are refused (400).",
    )
    inactivity_timeout: float | None = Field(
        None,
        gt=0,
        le=MAX_INACTIVITY_TIMEOUT_S,
        description="Seconds without operations or session heartbeats after which the job is stopped "
        "(resumable); '1800s' is accepted. Unset: 3600.",
    )
    max_restarts: int = Field(
        3,
        ge=0,
        le=MAX_RESTARTS,
        description="Times the control plane relaunches the job after its process dies (crash, preemption).",
    )
    requested_job_id: str | None = Field(
        None,
        description="Stable job id (1-63 of [a-z0-9-]); a retried create with the same id is idempotent.",
    )
    launcher_options: dict[str, str] = Field(
        default_factory=dict,
        description="Launcher-specific placement, e.g. ray: num_cpus=2 num_gpus=1 (KEY=VALUE).",
    )

    @field_validator("inactivity_timeout", mode="before")
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        return parse_duration_s(value)

    @field_validator("requested_job_id")
    @classmethod
    def _job_id(cls, value: str | None) -> str | None:
        return None if value is None else validate_job_id(value)

    def same_request(self, other: TrainerJobConfig) -> bool:
        """Whether `other` asks for the same job (a retry), ignoring the id itself."""
        mine = self.model_dump(exclude={"requested_job_id"})
        return mine == other.model_dump(exclude={"requested_job_id"})


class TrainerJob(WireModel):
    """A trainer job as every job route answers it."""

    job_id: str
    name: str
    """`trainerJobs/<job_id>`."""
    state: JobState
    reason: str | None = None
    """Why the job is in its state (launcher error, exit code, inactivity...)."""
    config: TrainerJobConfig
    base_url: str | None = None
    """The job's Tinker endpoint through the control plane: `<control plane>/training/v1/trainerJobs/<job_id>`."""
    direct_url: str | None = None
    """The job process's own address while it runs (reaches the process, not the control plane)."""
    launcher: str
    restart_count: int = 0
    """Relaunches since the job was created or last resumed."""
    created_at: datetime
    updated_at: datetime
    last_activity_at: datetime | None = None
    deleted_at: datetime | None = None
    model_load_s: float | None = None
    """Seconds the job's trainer took to load its base model at the last launch."""
    inactivity_timeout_s: float


class TrainerJobsResponse(WireModel):
    jobs: list[TrainerJob]


class JobCheckpoint(WireModel):
    """A checkpoint a job wrote, listed by the control plane from the job's own catalogue, also
    while the job is stopped or deleted (within the retention period). Oldest first."""

    name: str
    """`trainerJobs/<job_id>/checkpoints/<run_id>/<kind>/<name>`."""
    tinker_path: str
    """`tinker://<run_id>/<kind>/<name>`: what the job's Tinker endpoint accepts."""
    checkpoint_type: str
    """training (weights + optimizer; resumable) | sampler (promotable)."""
    create_time: datetime
    size_bytes: int | None = None
    promotable: bool
    resumable: bool


class JobCheckpointsResponse(WireModel):
    checkpoints: list[JobCheckpoint]


class DeleteJobCheckpointRequest(WireModel):
    tinker_path: str


class PromoteCheckpointRequest(WireModel):
    """Promote a job's sampler checkpoint to a named model of the caller's."""

    tinker_path: str
    output_model_id: str
    """1-63 of [a-z0-9-]; then a valid `base_model` for the caller's jobs."""


class ExportMergedRequest(WireModel):
    tinker_path: str


class ExportedModel(WireModel):
    """A Hugging Face model directory on the control plane's machine made from a sampler checkpoint."""

    name: str | None = None
    """The promoted model's name (None for a plain export)."""
    path: str
    base_model: str
    source: str
    """The tinker path it was made from."""
    merged_lora: bool
    """True when a LoRA adapter was merged into the base weights."""
