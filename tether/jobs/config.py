"""Operator settings of the control plane's trainer jobs (part of `tether serve`'s settings).

`ServerConfig` inherits these fields, so `tether serve --job-launcher ray` and
`TETHER_JOB_LAUNCHER=ray` work like every other server option (tether/cli_args.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class JobSettings(BaseModel):
    """How the control plane launches, watches and retires dedicated trainer jobs."""

    job_launcher: Literal["local", "ray"] = Field(
        "local", description="How trainer jobs are started: local subprocesses, or actors on a Ray cluster."
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster to place jobs on ('auto', 'host:port'); unset: $RAY_ADDRESS, else a private "
        "single-node cluster on 127.0.0.1.",
    )
    job_models: list[str] = Field(
        default_factory=list,
        description="Base models a trainer job may ask for (unset: the served models and the model aliases).",
    )
    job_max_ranks: int | None = Field(
        None,
        ge=1,
        description="Most ranks one job may ask for on a machine; with the local launcher, ranks x nodes "
        "(every node runs here) (unset: this machine's CPU count).",
    )
    job_poll_interval_s: float = Field(
        1.0,
        gt=0,
        description="How often the control plane checks its jobs' processes, readiness and inactivity.",
    )
    job_startup_timeout_s: float = Field(
        900.0, gt=0, description="A job that does not become ready this long after its launch is failed."
    )
    job_retention_s: float = Field(
        30 * 86400.0,
        ge=0,
        description="How long a deleted job's tombstone and checkpoints are kept (listable) before they are purged.",
    )
