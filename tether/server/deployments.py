"""Deployments managed by `tether serve`: their catalogue rows and their serving processes.

A deployment is one `python -m tether.deployment` subprocess serving one base model on a local
port, with its own state directory (`<data_dir>/deployments/<owner>/<id>/`) where it records the
last good weights. The registry starts it, watches it become ready, proxies to it, and stops it.
Its row in the catalogue (`DeploymentRow`, alembic `0004_deployments`) keeps what a restarted
server needs: after a restart every deployment that was not deleted is started again and resumes
its last good weights.

States: CREATING (process starting) → READY (healthz answers) → FAILED (the process exited or never
became ready; `error` says why); DELETED rows are removed. It knows nothing of HTTP routes.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import DateTime, Integer, String, delete, select
from sqlalchemy.orm import Mapped, mapped_column

from tether.server.catalogue import Base, Catalogue, utcnow
from tether.types.deployment_contract import ADMIN_TOKEN_ENV
from tether.types.errors import ConflictError, NotFoundError, UserInputError

log = logging.getLogger("tether.server")

STATES = ("CREATING", "READY", "FAILED", "DELETED")
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
READY_TIMEOUT_S = 300.0


class DeploymentRow(Base):
    __tablename__ = "deployments"
    deployment_id: Mapped[str] = mapped_column(String, primary_key=True)
    owner: Mapped[str] = mapped_column(String, index=True)
    base_model: Mapped[str] = mapped_column(String)
    state: Mapped[str] = mapped_column(String)
    """CREATING | READY | FAILED."""
    transition: Mapped[str] = mapped_column(String)
    """SYNC | ASYNC hot-load transition."""
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The create request as given (replica counts, trainer job, description...)."""
    port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """The serving process (a restarted server stops a leftover one before starting anew)."""
    error: Mapped[str | None] = mapped_column(String, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


@dataclass
class _Process:
    popen: subprocess.Popen
    port: int
    log_path: Path
    admin_token: str = ""
    """What the process's `POST /hot_load` requires (fresh per launch; only this server holds it)."""


def _stop_leftover(pid: int | None) -> None:
    """Stop a deployment process a previous server run left behind (only if it is one)."""
    if not pid:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"tether.deployment" in cmdline:
        try:
            os.kill(pid, 15)
        except OSError:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DeploymentRegistry:
    """Catalogue rows + serving subprocesses of every deployment of this server."""

    def __init__(
        self,
        catalogue: Catalogue,
        data_dir: Path,
        *,
        model_paths: dict[str, str] | None = None,
        torch_threads: int | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.root = Path(data_dir) / "deployments"
        self.model_paths = dict(model_paths or {})
        self.torch_threads = torch_threads
        self._lock = threading.Lock()
        self._processes: dict[str, _Process] = {}
        self._started = False

    # ---- rows

    def _row(self, deployment_id: str, owner: str) -> DeploymentRow:
        with self.catalogue.reading() as s:
            row = s.get(DeploymentRow, deployment_id)
        if row is None or row.owner != owner:
            raise NotFoundError(f"deployment {deployment_id!r} does not exist")
        return row

    def _update(self, deployment_id: str, **values: Any) -> None:
        with self.catalogue.writing() as s:
            row = s.get(DeploymentRow, deployment_id)
            if row is not None:
                for key, value in values.items():
                    setattr(row, key, value)
                row.updated_at = utcnow()

    def get(self, deployment_id: str, owner: str) -> DeploymentRow:
        """The deployment's row, its state refreshed from its process (NotFoundError if absent)."""
        self.ensure_started()
        self._refresh(deployment_id)
        return self._row(deployment_id, owner)

    def list(self, owner: str) -> list[DeploymentRow]:
        self.ensure_started()
        with self.catalogue.reading() as s:
            ids = list(
                s.scalars(
                    select(DeploymentRow.deployment_id)
                    .where(DeploymentRow.owner == owner)
                    .order_by(DeploymentRow.created_at)
                )
            )
        for deployment_id in ids:
            self._refresh(deployment_id)
        with self.catalogue.reading() as s:
            return list(
                s.scalars(
                    select(DeploymentRow)
                    .where(DeploymentRow.owner == owner)
                    .order_by(DeploymentRow.created_at)
                )
            )

    # ---- lifecycle

    def create(
        self,
        owner: str,
        deployment_id: str,
        base_model: str,
        *,
        transition: str = "ASYNC",
        config: dict[str, Any] | None = None,
    ) -> DeploymentRow:
        """Record the deployment and start its process. ConflictError if the id is taken."""
        self.ensure_started()
        if not isinstance(deployment_id, str) or not _ID.match(deployment_id):
            raise UserInputError(
                "must be 1-63 lowercase letters, digits or dashes, starting with a letter or "
                f"digit; got {deployment_id!r}",
                field="deployment_id",
            )
        if transition not in ("SYNC", "ASYNC"):
            raise UserInputError(
                f"must be SYNC or ASYNC, got {transition!r}", field="hot_load_transition_type"
            )
        if self.model_paths and base_model not in self.model_paths:
            raise UserInputError(
                f"this server does not serve base model {base_model!r}; it serves {sorted(self.model_paths)}",
                field="base_model",
            )
        now = utcnow()
        with self.catalogue.writing() as s:
            if s.get(DeploymentRow, deployment_id) is not None:
                raise ConflictError(f"deployment {deployment_id!r} already exists")
            s.add(
                DeploymentRow(
                    deployment_id=deployment_id,
                    owner=owner,
                    base_model=base_model,
                    state="CREATING",
                    transition=transition,
                    config=dict(config or {}),
                    created_at=now,
                    updated_at=now,
                )
            )
        self._launch(deployment_id, owner, base_model, transition)
        return self._row(deployment_id, owner)

    def delete(self, deployment_id: str, owner: str) -> None:
        """Stop the process and forget the deployment (its state directory is removed)."""
        self.ensure_started()  # first, so a process left by a previous server run is stopped too
        self._row(deployment_id, owner)
        self._stop(deployment_id)
        with self.catalogue.writing() as s:
            s.execute(delete(DeploymentRow).where(DeploymentRow.deployment_id == deployment_id))
        shutil.rmtree(self._state_dir(owner, deployment_id), ignore_errors=True)

    def ensure_started(self) -> None:
        """After a server restart: start again every deployment the catalogue still has."""
        with self._lock:
            if self._started:
                return
            self._started = True
        with self.catalogue.reading() as s:
            rows = list(s.scalars(select(DeploymentRow)))
        ours = {process.popen.pid for process in self._processes.values()}
        for row in rows:
            if row.pid not in ours:
                _stop_leftover(row.pid)
            if row.deployment_id not in self._processes:
                self._update(row.deployment_id, state="CREATING", error=None)
                self._launch(row.deployment_id, row.owner, row.base_model, row.transition)

    def close(self) -> None:
        for deployment_id in list(self._processes):
            self._stop(deployment_id)

    # ---- processes

    def _state_dir(self, owner: str, deployment_id: str) -> Path:
        return self.root / re.sub(r"[^A-Za-z0-9_.-]", "_", owner) / deployment_id

    def _command(
        self, deployment_id: str, base_model: str, transition: str, port: int, state_dir: Path
    ) -> Sequence[str]:
        """The serving process's command line."""
        command = [
            sys.executable,
            "-m",
            "tether.deployment",
            "--base-model",
            base_model,
            "--port",
            str(port),
            "--state-dir",
            str(state_dir),
            "--transition",
            transition,
            "--model-name",
            deployment_id,
        ]
        if base_model in self.model_paths and self.model_paths[base_model] != base_model:
            command += ["--model-path", self.model_paths[base_model]]
        if self.torch_threads:
            command += ["--torch-threads", str(self.torch_threads)]
        return command

    def _launch(self, deployment_id: str, owner: str, base_model: str, transition: str) -> None:
        state_dir = self._state_dir(owner, deployment_id)
        state_dir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        command = list(self._command(deployment_id, base_model, transition, port, state_dir))
        log_path = state_dir / "deployment.log"
        env = dict(os.environ)
        admin_token = secrets.token_urlsafe(32)
        env[ADMIN_TOKEN_ENV] = admin_token  # the environment: not visible in the process list
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")] if p
        )
        with open(log_path, "ab") as log_file:
            popen = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        with self._lock:
            self._processes[deployment_id] = _Process(popen, port, log_path, admin_token)
        self._update(deployment_id, port=port, pid=popen.pid, state="CREATING", error=None)
        threading.Thread(
            target=self._watch, args=(deployment_id,), daemon=True, name=f"deployment-{deployment_id}"
        ).start()

    def _watch(self, deployment_id: str) -> None:
        process = self._processes.get(deployment_id)
        if process is None:
            return
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and process.popen.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{process.port}/healthz", timeout=2).status_code == 200:
                    if self._processes.get(deployment_id) is process:  # not replaced meanwhile
                        self._update(deployment_id, state="READY", error=None)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self._refresh(deployment_id, startup_failed=True, process=process)

    def _refresh(
        self, deployment_id: str, *, startup_failed: bool = False, process: _Process | None = None
    ) -> None:
        """Mark the deployment FAILED if its process exited (or, with `startup_failed`, never became
        ready). `process`: the one a watcher watched; a process that was replaced since (restart,
        delete and create again) says nothing about the deployment's new one."""
        current = self._processes.get(deployment_id)
        if current is None or (process is not None and process is not current):
            return
        process = current
        code = process.popen.poll()
        if code is None and not startup_failed:
            return
        tail = process.log_path.read_text(errors="replace")[-600:] if process.log_path.is_file() else ""
        reason = f"the serving process exited with code {code}" if code is not None else "never became ready"
        self._update(deployment_id, state="FAILED", error=f"{reason}: {tail.strip()}")

    def _stop(self, deployment_id: str) -> None:
        with self._lock:
            process = self._processes.pop(deployment_id, None)
        if process is None:
            return
        process.popen.terminate()
        try:
            process.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.popen.kill()
            process.popen.wait(timeout=15)

    def did_not_answer(self, deployment_id: str, owner: str, wait_s: float = 10.0) -> DeploymentRow:
        """After a request to the serving process failed: the row, FAILED with the cause if the
        process died. Blocks up to `wait_s` for a dying process to exit (its sockets close a moment
        before it can be reaped), so call it off the event loop."""
        process = self._processes.get(deployment_id)
        if process is not None:
            try:
                process.popen.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                pass  # alive but not answering: the row stays as it is
        return self.get(deployment_id, owner)

    def kill_for_test(self, deployment_id: str) -> None:
        """SIGKILL the serving process (to test crash recovery)."""
        process = self._processes[deployment_id]
        process.popen.kill()
        process.popen.wait(timeout=15)

    def restart(self, deployment_id: str, owner: str) -> DeploymentRow:
        """Start the serving process again (after a crash); it resumes its last good weights."""
        self.ensure_started()  # else a later first `get` would take the new process for a leftover
        row = self._row(deployment_id, owner)
        self._stop(deployment_id)
        self._launch(deployment_id, owner, row.base_model, row.transition)
        return self._row(deployment_id, owner)

    def admin_headers(self, deployment_id: str) -> dict[str, str]:
        """The headers that authorise a hot-load on the deployment's own port."""
        process = self._processes.get(deployment_id)
        return {"Authorization": f"Bearer {process.admin_token}"} if process is not None else {}

    def url(self, deployment_id: str, owner: str) -> str:
        """The serving process's base URL; ConflictError unless it is READY."""
        row = self.get(deployment_id, owner)
        process = self._processes.get(deployment_id)
        if row.state != "READY" or process is None:
            raise ConflictError(
                f"deployment {deployment_id!r} is {row.state}, not READY"
                + (f": {row.error}" if row.error else "")
            )
        return f"http://127.0.0.1:{process.port}"


def deployment_info(row: DeploymentRow, status: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON a client sees for a deployment (with the live hot-load status when READY)."""
    replicas = (status or {}).get("replicas") or []
    return {
        "deployment_id": row.deployment_id,
        "name": f"deployments/{row.deployment_id}",
        "base_model": row.base_model,
        "state": row.state,
        "hot_load_transition_type": row.transition,
        "error": row.error,
        "config": row.config,
        "created_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
        "current_snapshot_identity": replicas[0]["current_snapshot_identity"] if replicas else None,
        "current": (status or {}).get("current"),
        "replicas": replicas,
    }
