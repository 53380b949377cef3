"""The lifecycle of dedicated trainer jobs: create, watch, relaunch, stop for inactivity, delete.

`JobManager` owns the control plane's side of every job. A job is a row in the catalogue
(tether/jobs/store.py) plus, while it lives, a launcher handle (tether/jobs/launchers.py). `tick()`,
run every `job_poll_interval_s` by the server, moves jobs along:

    CREATING --launch--> PENDING --ready file + healthz 200--> RUNNING
    PENDING/RUNNING --process died--> PENDING (relaunched, restart_count+1) | FAILED (no restarts left)
    RUNNING --no activity for inactivity_timeout--> COMPLETED (reason recorded; resumable)
    FAILED | CANCELLED | COMPLETED --resume--> PENDING
    any --delete--> DELETING --> DELETED (tombstone; purged with its files after job_retention_s)

The server runs `tick()` when `wait_wake` returns: at the latest every `job_poll_interval_s`, and at
once when a watcher thread sees a pending job's ready file appear or a local job's process end
(it looks every `WATCH_INTERVAL_S`), so readiness and deaths are acted on without waiting out a
poll interval. `wait_for_change` lets a client's wait hold its request until the job's state moves.

Activity is every request the control plane forwards to the job (operations and session heartbeats
alike). A launcher failure puts the job in FAILED with the launcher's error text and leaves nothing
running. After a control-plane restart, jobs recorded as live have no handle and are relaunched.

Where a job's files live: `<data_dir>/jobs/<owner>/<job_id>/` holds the job's API key (0600), its
spec, its log, its ready file and its own data directory `data/` (the job's catalogue `tether.db`
and `checkpoints/`). The control plane lists and deletes a job's checkpoints by opening that
catalogue (tether/jobs/checkpoints.py), so they stay available while the job is stopped and after
it is deleted, until the retention period ends. Blocking (catalogue, processes, healthz): call
off the event loop.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import secrets
import shutil
import ssl
import threading
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from tether.jobs.checkpoints import JobCheckpoints
from tether.jobs.errors import JobConflictError, JobNotRunningError
from tether.jobs.launchers import Launcher, LaunchError, LaunchSpec, make_launcher
from tether.jobs.promote import PromotedModels
from tether.jobs.runner import API_KEY_ENV, LAUNCHED_AT_ENV, JobProcessSpec, error_file
from tether.jobs.store import JobStore, TrainerJobRow
from tether.server.catalogue import Catalogue, utcnow
from tether.server.config import ServerConfig
from tether.types.errors import UserInputError
from tether.types.wire_jobs import (
    DEFAULT_INACTIVITY_TIMEOUT_S,
    LIVE_STATES,
    RESUMABLE_STATES,
    TOMBSTONE_STATES,
    JobState,
    TrainerJobConfig,
)

log = logging.getLogger("tether.jobs")

HEALTHZ_TIMEOUT_S = 5.0
LOG_TAIL_CHARS = 2000
WATCH_INTERVAL_S = 0.02
"""How often the watcher thread looks for ready files and ended local processes (a stat and a waitpid)."""
MAX_CHANGE_WAIT_S = 30.0
"""Longest `wait_for_change` hold (well inside clients' request timeouts)."""


def _key(owner: str, job_id: str) -> tuple[str, str]:
    return owner, job_id


class JobManager(JobCheckpoints):
    """Creates and watches the trainer jobs of one control plane (thread-safe)."""

    def __init__(
        self, catalogue: Catalogue, config: ServerConfig, *, launcher: Launcher | None = None
    ) -> None:
        self.config = config
        self.store = JobStore(catalogue)
        self.root = Path(config.data_dir).expanduser() / "jobs"
        self._launcher = launcher
        self._handles: dict[tuple[str, str], Any] = {}
        self._activity: dict[tuple[str, str], datetime] = {}
        self._catalogues: dict[tuple[str, str], Catalogue] = {}
        self._lock = threading.RLock()
        self._tls_lock = threading.Lock()
        self._http_client: httpx.Client | None = None
        self._tls: ssl.SSLContext | None = None
        self.promoted = PromotedModels(Path(config.data_dir).expanduser())
        self._wake = threading.Event()
        self._changed = threading.Condition()
        self._watching: set[tuple[str, str]] = set()
        """Jobs launched and not yet seen ready: the watcher looks for their ready files."""
        self._watcher: threading.Thread | None = None
        self._closed = False

    @property
    def launcher(self) -> Launcher:
        """Made on first use (a Ray launcher connects to its cluster then)."""
        with self._lock:
            if self._launcher is None:
                self._launcher = make_launcher(
                    self.config.job_launcher,
                    ray_address=self.config.ray_address,
                    max_ranks=self.config.job_max_ranks,
                )
            return self._launcher

    # ---- files of a job

    def job_dir(self, owner: str, job_id: str) -> Path:
        return self.root / owner / job_id

    def _api_key(self, owner: str, job_id: str) -> str:
        """The job's own API key: only the control plane (and whoever reads this 0600 file) holds it."""
        path = self.job_dir(owner, job_id) / "api_key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("tml-job-" + secrets.token_hex(16))
        return path.read_text().strip()

    def allowed_models(self, owner: str) -> builtins.list[str]:
        """Base models the owner's jobs may use: the configured ones and the owner's promoted models."""
        configured = self.config.job_models or [*self.config.models, *self.config.model_aliases]
        return [*configured, *self.promoted.aliases(owner)]

    def _model_aliases(self, owner: str) -> dict[str, str]:
        return {**self.config.model_aliases, **self.promoted.aliases(owner)}

    # ---- requests

    def create(self, owner: str, config: TrainerJobConfig) -> TrainerJobRow:
        """Create and launch a job; a retry with the same id and config returns the same job.

        Raises UserInputError (unknown base model, impossible resources), JobConflictError
        (the id belongs to a deleted job, or to a job asked for with another config).
        """
        allowed = self.allowed_models(owner)
        if config.base_model not in allowed:
            raise UserInputError(
                f"unknown base model {config.base_model!r} (allowed: {allowed})", field="base_model"
            )
        if config.forward_only and config.nproc_per_node * config.node_count > 1:
            raise UserInputError(
                "a forward-only reference job runs on one rank (it holds no gradients or optimizer "
                "state to shard); ask for nproc_per_node=1 and node_count=1",
                field="forward_only",
            )
        self.launcher.check(config)
        job_id = config.requested_job_id or f"trainer-{uuid.uuid4().hex[:8]}"
        config = config.model_copy(update={"requested_job_id": job_id})
        with self._lock:
            existing = self.store.insert(owner, job_id, config, self.launcher.name)
            if existing is not None:
                if existing.job_state in TOMBSTONE_STATES:
                    raise JobConflictError(
                        f"job {job_id!r} was deleted; its id cannot be reused", field="requested_job_id"
                    )
                if not existing.job_config.same_request(config):
                    raise JobConflictError(
                        f"job {job_id!r} exists with a different configuration", field="requested_job_id"
                    )
                return existing
            self._launch(owner, job_id, config)
            return self.store.get(owner, job_id)

    def get(self, owner: str, job_id: str) -> TrainerJobRow:
        return self.store.get(owner, job_id)

    def list(self, owner: str, *, include_deleted: bool = False) -> builtins.list[TrainerJobRow]:
        return self.store.list(owner, include_deleted=include_deleted)

    def resume(self, owner: str, job_id: str) -> TrainerJobRow:
        """Relaunch a stopped job (a live one is left as it is); a deleted one is a 409 on `job_id`."""
        with self._lock:
            row = self.store.get(owner, job_id)
            if row.job_state in TOMBSTONE_STATES:
                raise JobConflictError(f"job {job_id!r} is deleted and cannot be resumed", field="job_id")
            if row.job_state in RESUMABLE_STATES:
                self.store.update(owner, job_id, restart_count=0)
                self._launch(owner, job_id, row.job_config, reason="resumed")
            return self.store.get(owner, job_id)

    def cancel(self, owner: str, job_id: str) -> TrainerJobRow:
        """Stop a live job on request (CANCELLED, resumable)."""
        with self._lock:
            row = self.store.get(owner, job_id)
            if row.job_state in LIVE_STATES:
                self._stop(owner, job_id)
                self.store.update(
                    owner, job_id, state=JobState.CANCELLED, reason="cancelled on request", url=None
                )
            return self.store.get(owner, job_id)

    def delete(self, owner: str, job_id: str) -> TrainerJobRow:
        """Stop the job and leave a tombstone (a second delete is a no-op); checkpoints stay listable."""
        with self._lock:
            row = self.store.get(owner, job_id)
            if row.job_state is JobState.DELETED:
                return row
            self.store.update(owner, job_id, state=JobState.DELETING, reason="deleting")
            self._stop(owner, job_id)
            self.store.update(
                owner,
                job_id,
                state=JobState.DELETED,
                reason="deleted on request",
                url=None,
                deleted_at=utcnow(),
            )
            return self.store.get(owner, job_id)

    def touch(self, owner: str, job_id: str) -> None:
        """Note activity (a forwarded request); written to the catalogue on the next tick."""
        self._activity[_key(owner, job_id)] = utcnow()

    def target(self, owner: str, job_id: str) -> tuple[str, str]:
        """(the job process's URL, its API key) for forwarding; NotFoundError, or JobNotRunningError (503)."""
        row = self.store.get(owner, job_id)
        if row.job_state is not JobState.RUNNING or not row.url:
            raise JobNotRunningError(
                f"trainer job {job_id!r} is not running (state {row.job_state.short}"
                f"{': ' + row.reason if row.reason else ''})"
            )
        return row.url, self._api_key(owner, job_id)

    def handle(self, owner: str, job_id: str):
        """The launcher handle of a live job (tests and benchmarks kill it to simulate a crash)."""
        return self._handles.get(_key(owner, job_id))

    # ---- launching and stopping

    def _launch(
        self, owner: str, job_id: str, config: TrainerJobConfig, *, reason: str | None = None
    ) -> None:
        directory = self.job_dir(owner, job_id)
        directory.mkdir(parents=True, exist_ok=True)
        ready_file = directory / "ready.json"
        ready_file.unlink(missing_ok=True)
        error_file(ready_file).unlink(missing_ok=True)
        server = self.config.model_copy(
            update={
                "host": "127.0.0.1",
                "port": 0,
                "models": [config.base_model],
                "api_keys": [],
                "ready_file": None,
                "data_dir": directory / "data",
                "trainer_process": False,
                "forward_only": config.forward_only,
                "job_models": [],
                "model_aliases": self._model_aliases(owner),
            }
        )
        spec = JobProcessSpec(job_id=job_id, server=server, ready_file=ready_file)
        spec_file = directory / "spec.json"
        spec_file.write_text(spec.model_dump_json())
        pythonpath = os.pathsep.join(
            p for p in [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")] if p
        )
        launch = LaunchSpec(
            job_id=job_id,
            spec_file=spec_file,
            log_path=directory / "job.log",
            env={
                API_KEY_ENV: self._api_key(owner, job_id),
                LAUNCHED_AT_ENV: repr(time.time()),
                "PYTHONPATH": pythonpath,
            },
            nproc_per_node=config.nproc_per_node,
            node_count=config.node_count,
            options=dict(config.launcher_options),
        )
        try:
            handle = self.launcher.launch(launch)
        except LaunchError as exc:
            self.store.update(owner, job_id, state=JobState.FAILED, reason=str(exc), url=None)
            return
        self._handles[_key(owner, job_id)] = handle
        self.store.update(
            owner, job_id, state=JobState.PENDING, reason=reason, url=None, launched_at=utcnow()
        )
        self._watching.add(_key(owner, job_id))
        self._start_watcher()

    # ---- waking the monitor

    def _start_watcher(self) -> None:
        if self._watcher is None and not self._closed:
            self._watcher = threading.Thread(target=self._watch_loop, name="tether-jobs-watch", daemon=True)
            self._watcher.start()

    def _watch_loop(self) -> None:
        """Wake the monitor when a pending job's ready file appears or a local job's process ends."""
        while not self._closed:
            for key in list(self._watching):
                if (self.job_dir(*key) / "ready.json").exists() or error_file(
                    self.job_dir(*key) / "ready.json"
                ).exists():
                    self._watching.discard(key)
                    self._wake.set()
            for handle in list(self._handles.values()):
                if getattr(handle, "cheap_poll", False) and handle.poll() is not None:
                    self._wake.set()
            time.sleep(WATCH_INTERVAL_S)

    def wait_wake(self, timeout_s: float) -> None:
        """Block until something needs a `tick` (see the module docstring) or `timeout_s` passes."""
        self._wake.wait(timeout_s)
        self._wake.clear()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait_for_change(self, owner: str, job_id: str, state: JobState, timeout_s: float) -> TrainerJobRow:
        """The job once its state is not `state`, or as it is after `timeout_s` (at most
        MAX_CHANGE_WAIT_S); NotFoundError if the owner has no such job."""
        deadline = time.monotonic() + min(max(timeout_s, 0.0), MAX_CHANGE_WAIT_S)
        while True:
            row = self.store.get(owner, job_id)
            remaining = deadline - time.monotonic()
            if row.job_state is not state or remaining <= 0 or self._closed:
                return row
            with self._changed:
                self._changed.wait(min(remaining, 1.0))

    def _stop(self, owner: str, job_id: str) -> None:
        self._watching.discard(_key(owner, job_id))
        handle = self._handles.pop(_key(owner, job_id), None)
        if handle is not None:
            handle.stop()

    def _failure_text(self, owner: str, job_id: str) -> str:
        """What the job process said about its failure (its error file), then the end of its log."""
        parts = []
        for name, limit in (("error.txt", LOG_TAIL_CHARS), ("job.log", LOG_TAIL_CHARS)):
            try:
                parts.append(
                    (self.job_dir(owner, job_id) / name).read_text(errors="replace")[-limit:].strip()
                )
            except OSError:
                pass
        return "\n".join(p for p in parts if p)

    # ---- the monitor

    def tick(self) -> None:
        """One pass over the live jobs (and expired tombstones); the server runs it periodically."""
        with self._lock:
            activity, self._activity = self._activity, {}
            self.store.touch(activity)
            for row in self.store.in_states(set(LIVE_STATES)):
                try:
                    self._watch(row)
                except Exception:  # noqa: BLE001 - one job's trouble never stops the others' monitoring
                    log.exception("watching trainer job %s failed", row.job_id)
            for row in self.store.expired_tombstones(self.config.job_retention_s):
                self._purge(row)
        self._notify()

    def _watch(self, row: TrainerJobRow) -> None:
        owner, job_id, config = row.owner, row.job_id, row.job_config
        handle = self._handles.get(_key(owner, job_id))
        if handle is None:  # recorded as live by an earlier control plane, or never launched
            self._launch(owner, job_id, config, reason="relaunched: the control plane restarted")
            return
        code = handle.poll()
        if code is not None:
            self._handles.pop(_key(owner, job_id), None)
            handle.kill()  # whatever is left of its process group (ranks of a lost node) goes too
            what = f"the job's process exited with code {code}"
            if row.restart_count < config.max_restarts:
                log.warning(
                    "trainer job %s: %s; relaunching (%d/%d)",
                    job_id,
                    what,
                    row.restart_count + 1,
                    config.max_restarts,
                )
                self.store.update(
                    owner,
                    job_id,
                    restart_count=row.restart_count + 1,
                    state=JobState.PENDING,
                    url=None,
                    reason=f"{what}; relaunching",
                )  # never RUNNING while it relaunches
                self._launch(
                    owner,
                    job_id,
                    config,
                    reason=f"{what}; relaunched ({row.restart_count + 1}/{config.max_restarts})",
                )
            else:
                tail = self._failure_text(owner, job_id)
                self.store.update(
                    owner,
                    job_id,
                    state=JobState.FAILED,
                    url=None,
                    reason=f"{what} (no restarts left)" + (f"\n{tail}" if tail else ""),
                )
            return
        now = utcnow()
        if row.job_state is JobState.PENDING:
            ready = self._ready(owner, job_id)
            if ready is not None:
                url, load_s = ready
                self.store.update(
                    owner,
                    job_id,
                    expect={JobState.PENDING},
                    state=JobState.RUNNING,
                    url=url,
                    model_load_s=load_s,
                    last_activity_at=now,
                )
            elif row.launched_at is not None and now - row.launched_at > timedelta(
                seconds=self.config.job_startup_timeout_s
            ):
                self._stop(owner, job_id)
                self.store.update(
                    owner,
                    job_id,
                    state=JobState.FAILED,
                    url=None,
                    reason=f"not ready within {self.config.job_startup_timeout_s:.0f} s of its launch",
                )
        elif row.job_state is JobState.RUNNING:
            timeout = config.inactivity_timeout or DEFAULT_INACTIVITY_TIMEOUT_S
            last = max(t for t in (row.last_activity_at, row.launched_at, row.created_at) if t is not None)
            if (now - last).total_seconds() > timeout:
                self._stop(owner, job_id)
                self.store.update(
                    owner,
                    job_id,
                    state=JobState.COMPLETED,
                    url=None,
                    reason=f"stopped for inactivity: no operations or heartbeats for {timeout:.0f} s",
                )

    def tls_context(self) -> ssl.SSLContext:
        """The TLS settings of the control plane's HTTP clients, built once: loading the trust store
        takes about half a second on a busy machine, so a server that never launches a job (every
        job's own process among them) never builds it, and a control plane builds it beside its
        start-up (`prewarm`), not on its first job's critical path."""
        with self._tls_lock:
            if self._tls is None:
                self._tls = httpx.create_ssl_context()
            return self._tls

    def prewarm(self) -> None:
        """Build what the first job will need (the TLS context, the healthz client) ahead of it."""
        self._http()

    def _http(self) -> httpx.Client:
        """The healthz client, made on first use (see `tls_context`)."""
        tls = self.tls_context()
        with self._lock:
            if self._http_client is None:
                self._http_client = httpx.Client(timeout=HEALTHZ_TIMEOUT_S, verify=tls)
            return self._http_client

    def _ready(self, owner: str, job_id: str) -> tuple[str, float] | None:
        """(url, model load seconds) once the job wrote its ready file and its healthz answers 200."""
        try:
            ready = json.loads((self.job_dir(owner, job_id) / "ready.json").read_text())
        except (OSError, ValueError):
            return None
        try:
            healthy = self._http().get(f"{ready['url']}/api/v1/healthz").status_code == 200
        except httpx.HTTPError:
            healthy = False
        return (ready["url"], float(ready["model_load_s"])) if healthy else None

    def _purge(self, row: TrainerJobRow) -> None:
        key = _key(row.owner, row.job_id)
        catalogue = self._catalogues.pop(key, None)
        if catalogue is not None:
            catalogue.close()
        shutil.rmtree(self.job_dir(row.owner, row.job_id), ignore_errors=True)
        self.store.purge(row.owner, row.job_id)

    # ---- lifetime

    def close(self) -> None:
        """Stop every job process this control plane started (their rows stay live: a restarted
        control plane relaunches them), and release the launcher."""
        self._closed = True
        self._wake.set()
        self._notify()
        with self._lock:
            for key in list(self._handles):
                self._stop(*key)
            for catalogue in self._catalogues.values():
                catalogue.close()
            self._catalogues.clear()
            if self._http_client is not None:
                self._http_client.close()
            if self._launcher is not None:
                self._launcher.close()
