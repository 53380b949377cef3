"""Dedicated trainer jobs from the SDK: `TrainerJobManager` and its checkpoint client.

The names, arguments and timeouts follow the Fireworks training SDK (fireworks-training-api.md §2,
§3, §9), so code written for it reads the same here:

    manager = TrainerJobManager(base_url="http://control-plane:8000", api_key="tml-...")
    endpoint = manager.create_and_wait(TrainerJobConfig(base_model="tether/tiny-qwen3", lora_rank=8))
    service = tether.ServiceClient(base_url=endpoint.base_url, api_key="tml-...")
    ...
    manager.delete(endpoint.job_id)

`endpoint.base_url` is the job's Tinker endpoint through the control plane
(`<control plane>/training/v1/trainerJobs/<job_id>`), so a client needs only the control plane's
address. Every request goes through `Transport.call` with a route of `tether.client.routes`. The
waits poll the job every `poll_interval_s`: ready is `RUNNING` and a 200 from the job's healthz;
`pending_timeout_s` bounds the wait for capacity (PENDING), `timeout_s` the rest.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from tether.client import event_loop, routes
from tether.client.routes import Route
from tether.client.transport import Transport
from tether.types.errors import NotFoundError, ServerError, TetherError, UserInputError
from tether.types.wire_jobs import (
    DeleteJobCheckpointRequest,
    ExportedModel,
    ExportMergedRequest,
    JobCheckpoint,
    JobState,
    PromoteCheckpointRequest,
    TrainerJob,
    TrainerJobConfig,
)

log = logging.getLogger("tether.client")

T = TypeVar("T")

TRAINER_READY_TIMEOUT_S = 900.0
DEFAULT_TRAINER_PENDING_TIMEOUT_S = 48 * 3600.0
RECONNECT_TIMEOUT_S = 600.0
RESUMABLE_WAIT_TIMEOUT_S = 120.0
POLL_INTERVAL_S = 5.0
STOPPED_SETTLE_S = 30.0
"""A stopped job is reported only after this long: a resume flips its state asynchronously."""

_RESUMABLE = {JobState.FAILED, JobState.CANCELLED, JobState.COMPLETED}
_STOPPED = {JobState.CANCELLED, JobState.COMPLETED, JobState.DELETING}

__all__ = [
    "TrainerJobManager",
    "TrainerJobConfig",
    "TrainerServiceEndpoint",
    "CreatedTrainerJob",
    "JobCheckpointClient",
    "JobCheckpoint",
    "JobState",
    "TrainerJob",
]


@dataclass(frozen=True)
class TrainerServiceEndpoint:
    """Where a ready job serves the Tinker protocol."""

    job_name: str
    job_id: str
    base_url: str
    max_context_length: int | None = None


@dataclass(frozen=True)
class CreatedTrainerJob:
    job_name: str
    job_id: str


class JobCheckpointClient:
    """Checkpoints of trainer jobs without a live trainer (reference §3): they stay listable while a
    job is stopped and after it is deleted, within the control plane's retention period."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        http_transport: httpx.AsyncBaseTransport | None = None,
        request_timeout_s: float = 60.0,
    ) -> None:
        """`base_url` defaults to $TETHER_BASE_URL, `api_key` to $TETHER_API_KEY."""
        base_url = base_url or os.environ.get("TETHER_BASE_URL")
        api_key = api_key or os.environ.get("TETHER_API_KEY")
        if not base_url:
            raise UserInputError(
                "no control plane address: pass base_url= or set TETHER_BASE_URL", field="base_url"
            )
        if not api_key:
            raise UserInputError("no API key: pass api_key= or set TETHER_API_KEY", field="api_key")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self._transport = Transport(
            self.base_url, api_key, http_transport=http_transport, timeout_s=request_timeout_s
        )

    def _call(
        self, route: Route[T], body: Any = None, *, params: dict[str, Any] | None = None, retry: bool = True
    ) -> T:
        return event_loop.run_sync(self._transport.call(route, body, params=params, retry=retry))

    def list_checkpoints(self, job_id: str) -> list[JobCheckpoint]:
        """The job's checkpoints, oldest first (`resumable`: weights + optimizer; `promotable`: sampler)."""
        return self._call(routes.LIST_JOB_CHECKPOINTS.at(job_id=job_id)).checkpoints

    def latest_resumable(self, job_id: str, *, prefix: str = "") -> JobCheckpoint | None:
        """The newest resumable checkpoint whose name (after `weights/`) starts with `prefix`."""
        rows = [
            r
            for r in self.list_checkpoints(job_id)
            if r.resumable and r.tinker_path.rsplit("/", 1)[-1].startswith(prefix)
        ]
        return max(rows, key=lambda r: r.create_time) if rows else None

    def delete_checkpoint(self, job_id: str, tinker_path: str) -> None:
        body = DeleteJobCheckpointRequest(tinker_path=tinker_path)
        self._call(routes.DELETE_JOB_CHECKPOINT.at(job_id=job_id), body)

    def promote_checkpoint(self, job_id: str, tinker_path: str, output_model_id: str) -> ExportedModel:
        """Make sampler checkpoint `tinker_path` of the job the caller's model `output_model_id` (a LoRA
        adapter is merged into its base): from then on a valid `base_model` of the caller's jobs.

        Raises UserInputError (a training checkpoint, a bad id), ConflictError (the name is taken)."""
        body = PromoteCheckpointRequest(tinker_path=tinker_path, output_model_id=output_model_id)
        return self._call(routes.PROMOTE_JOB_CHECKPOINT.at(job_id=job_id), body)

    def export_merged(self, job_id: str, tinker_path: str) -> ExportedModel:
        """Write sampler checkpoint `tinker_path` as a full Hugging Face model (LoRA merged) on the
        control plane's machine; returns where."""
        body = ExportMergedRequest(tinker_path=tinker_path)
        return self._call(routes.EXPORT_MERGED_JOB_CHECKPOINT.at(job_id=job_id), body)

    def close(self) -> None:
        event_loop.run_sync(self._transport.aclose())

    def __enter__(self) -> JobCheckpointClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrainerJobManager(JobCheckpointClient):
    """Create, wait for, resume, reconnect to and delete dedicated trainer jobs."""

    boot_time_s: float | None = None
    """Wall time of the last wait that ended with a ready job."""

    # ---- one-shot calls

    def create(self, config: TrainerJobConfig) -> CreatedTrainerJob:
        """Ask for a job and return at once. Without `requested_job_id`, one is generated here, so a
        retried request (lost answer, 5xx) finds the same job instead of making a second one.

        Raises UserInputError naming the field (unknown base model, impossible resources, bad id),
        ConflictError (the id belongs to a deleted job or to another configuration).
        """
        config = TrainerJobConfig.model_validate(
            config.model_dump() if isinstance(config, TrainerJobConfig) else config
        )
        if config.requested_job_id is None:
            config = config.model_copy(update={"requested_job_id": f"trainer-{uuid.uuid4().hex[:8]}"})
        job = self._call(routes.CREATE_TRAINER_JOB, config)
        return CreatedTrainerJob(job_name=job.name, job_id=job.job_id)

    def get(self, job_id: str) -> TrainerJob:
        """The job (tombstones too); NotFoundError if the caller has no such job."""
        return self._call(routes.GET_TRAINER_JOB.at(job_id=job_id))

    def try_get(self, job_id: str) -> TrainerJob | None:
        try:
            return self.get(job_id)
        except NotFoundError:
            return None

    def list(self, *, show_deleted: bool = False) -> list[TrainerJob]:
        params = {"show_deleted": "true"} if show_deleted else None
        return self._call(routes.LIST_TRAINER_JOBS, params=params).jobs

    def delete(self, job_id: str) -> None:
        """Delete the job (a tombstone; its checkpoints stay listable). Best effort: failures are logged."""
        try:
            self._call(routes.DELETE_TRAINER_JOB.at(job_id=job_id))
        except TetherError as exc:
            log.warning("deleting trainer job %s failed: %s", job_id, exc)

    def cancel(self, job_id: str) -> TrainerJob:
        return self._call(routes.CANCEL_TRAINER_JOB.at(job_id=job_id))

    def resume(self, job_id: str) -> TrainerJob:
        """Relaunch a stopped job; ConflictError (field job_id) for a deleted one."""
        return self._call(routes.RESUME_TRAINER_JOB.at(job_id=job_id))

    # ---- waits

    def create_and_wait(
        self,
        config: TrainerJobConfig,
        poll_interval_s: float = POLL_INTERVAL_S,
        timeout_s: float = TRAINER_READY_TIMEOUT_S,
        pending_timeout_s: float = DEFAULT_TRAINER_PENDING_TIMEOUT_S,
    ) -> TrainerServiceEndpoint:
        created = self.create(config)
        return self.wait_for_ready(
            created.job_id,
            created.job_name,
            poll_interval_s=poll_interval_s,
            timeout_s=timeout_s,
            pending_timeout_s=pending_timeout_s,
        )

    def wait_for_ready(
        self,
        job_id: str,
        job_name: str | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
        timeout_s: float = TRAINER_READY_TIMEOUT_S,
        pending_timeout_s: float = DEFAULT_TRAINER_PENDING_TIMEOUT_S,
    ) -> TrainerServiceEndpoint:
        """Poll until the job is RUNNING and its healthz answers 200.

        Raises ServerError if the job FAILED (with its reason), stays stopped past a settle window,
        is deleted, or is not ready within `timeout_s` (counted from the first non-PENDING state;
        PENDING is bounded by `pending_timeout_s`).
        """
        started = time.monotonic()
        placed_at: float | None = None
        stopped_since: float | None = None
        job = self.get(job_id)
        while True:
            now = time.monotonic()
            state = job.state
            if state is not JobState.PENDING and placed_at is None:
                placed_at = now
            if state is JobState.RUNNING and self._healthy(job_id):
                self.boot_time_s = now - started
                return TrainerServiceEndpoint(
                    job_name=job.name,
                    job_id=job.job_id,
                    base_url=str(job.base_url),
                    max_context_length=job.config.max_context_length,
                )
            if state is JobState.FAILED:
                raise ServerError(f"trainer job {job_id} failed: {job.reason}")
            if state is JobState.DELETED:
                raise ServerError(f"trainer job {job_id} is deleted")
            if state in _STOPPED:
                stopped_since = stopped_since if stopped_since is not None else now
                if now - stopped_since > STOPPED_SETTLE_S:
                    raise ServerError(f"trainer job {job_id} is {state.short}: {job.reason}")
            else:
                stopped_since = None
            if state is JobState.PENDING and placed_at is None:
                if now - started > pending_timeout_s:
                    raise ServerError(f"trainer job {job_id} still pending after {pending_timeout_s:.0f} s")
            elif placed_at is not None and now - placed_at > timeout_s:
                raise ServerError(
                    f"trainer job {job_id} not ready within {timeout_s:.0f} s (state {state.short})"
                )
            job = self._next(job_id, state, poll_interval_s)

    def _next(self, job_id: str, state: JobState, poll_interval_s: float) -> TrainerJob:
        """The job after at most `poll_interval_s`: at once when its state moves (the control plane
        holds the request until then; one that ignores the hold answers at once, and the rest of the
        interval is slept here)."""
        until = time.monotonic() + poll_interval_s
        params = {"wait_while_state": state.value, "wait_s": f"{poll_interval_s:.3f}"}
        job = self._call(routes.GET_TRAINER_JOB.at(job_id=job_id), params=params)
        if job.state is state and time.monotonic() < until:
            time.sleep(max(0.0, until - time.monotonic()))
            job = self.get(job_id)
        return job

    def wait_for_existing(
        self,
        job_id: str,
        poll_interval_s: float = POLL_INTERVAL_S,
        timeout_s: float = TRAINER_READY_TIMEOUT_S,
        pending_timeout_s: float = DEFAULT_TRAINER_PENDING_TIMEOUT_S,
    ) -> TrainerServiceEndpoint:
        return self.wait_for_ready(
            job_id, poll_interval_s=poll_interval_s, timeout_s=timeout_s, pending_timeout_s=pending_timeout_s
        )

    def resume_and_wait(
        self,
        job_id: str,
        poll_interval_s: float = POLL_INTERVAL_S,
        timeout_s: float = TRAINER_READY_TIMEOUT_S,
        pending_timeout_s: float = DEFAULT_TRAINER_PENDING_TIMEOUT_S,
    ) -> TrainerServiceEndpoint:
        self.resume(job_id)
        return self.wait_for_ready(
            job_id, poll_interval_s=poll_interval_s, timeout_s=timeout_s, pending_timeout_s=pending_timeout_s
        )

    def reconnect_and_wait(
        self,
        job_id: str,
        poll_interval_s: float = POLL_INTERVAL_S,
        timeout_s: float = RECONNECT_TIMEOUT_S,
        max_wait_for_resumable_s: float = RESUMABLE_WAIT_TIMEOUT_S,
        pending_timeout_s: float = DEFAULT_TRAINER_PENDING_TIMEOUT_S,
    ) -> TrainerServiceEndpoint:
        """After a preemption or crash: wait for a resumable state, resume if stopped, wait for ready.

        RUNNING or PENDING (the control plane is relaunching it): wait. FAILED, CANCELLED, COMPLETED:
        resume, then wait. CREATING or DELETING: poll up to `max_wait_for_resumable_s`, then raise
        "stuck". Errors reading the job are retried within the same budget. DELETED raises.
        """
        deadline = time.monotonic() + max_wait_for_resumable_s
        while True:
            try:
                job = self.get(job_id)
            except (ServerError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.info("reading trainer job %s failed (%s); retrying", job_id, exc)
                time.sleep(poll_interval_s)
                continue
            if job.state is JobState.DELETED:
                raise ServerError(f"trainer job {job_id} is deleted; it cannot be reconnected")
            if job.state in (JobState.RUNNING, JobState.PENDING):
                break
            if job.state in _RESUMABLE:
                self.resume(job_id)
                break
            if time.monotonic() > deadline:
                raise ServerError(
                    f"trainer job {job_id} stuck in {job.state.short} for {max_wait_for_resumable_s:.0f} s"
                )
            time.sleep(poll_interval_s)
        return self.wait_for_ready(
            job_id, poll_interval_s=poll_interval_s, timeout_s=timeout_s, pending_timeout_s=pending_timeout_s
        )

    def _healthy(self, job_id: str) -> bool:
        try:
            self._call(routes.TRAINER_JOB_HEALTHZ.at(job_id=job_id), retry=False)
        except TetherError:
            return False
        return True
