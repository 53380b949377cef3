"""A run's directory: metrics.jsonl, config.json, checkpoints.jsonl, and optional Weights & Biases.

Resume bookkeeping lives here. A checkpoint row records `next_step`, the first step whose update
the saved state does *not* contain. It is written only after the `save_state` for it completed,
and the save is enqueued after that step's `optim_step` on the model's ordered queue, so the state
holds exactly steps 0..next_step-1. Resuming trains step `next_step` next (the cookbook's
off-by-one, replaying a batch, cannot happen), and metrics rows of steps at or after it, logged
by the interrupted run after its last checkpoint, are dropped so the log has each step once.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("tether.recipes")

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"
CONFIG_FILE = "config.json"


@dataclass
class CheckpointRecord:
    name: str
    next_step: int
    state_path: str
    sampler_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("skipping a torn line in %s (an interrupted write)", path)
    return rows


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    """Everything a recipe writes to its log directory."""

    def __init__(
        self, log_dir: str | Path, *, wandb_project: str | None = None, wandb_name: str | None = None
    ):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.log_dir / METRICS_FILE
        self.checkpoints_path = self.log_dir / CHECKPOINTS_FILE
        self._wandb = _start_wandb(wandb_project, wandb_name, self.log_dir)
        self._to_server = True
        self._server_log: Any = None

    def write_config(self, config: Any) -> None:
        dumped = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
        (self.log_dir / CONFIG_FILE).write_text(json.dumps(dumped, indent=2) + "\n")
        if self._wandb is not None:
            self._wandb.config.update(dumped, allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict[str, Any], *, training_client: Any = None) -> None:
        """Append a metrics row; with `training_client`, also send its numbers to the server's record of
        the run (tether's SDK `log_metrics`, drawn by the console; other SDKs lack it and are skipped)."""
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        _append_jsonl(self.metrics_path, row)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=step)
        if training_client is not None and hasattr(training_client, "log_metrics") and self._to_server:
            self._send_to_server(training_client, step, row)

    def _send_to_server(self, training_client: Any, step: int, row: dict[str, Any]) -> None:
        """Not waited for (training goes on); a server that refuses them stops the sending, with a warning."""
        failure = (
            self._server_log.exception() if self._server_log is not None and self._server_log.done() else None
        )
        if failure is not None:
            log.warning("the server refused logged metrics (%s); logging to %s only", failure, self.log_dir)
            self._to_server = False
            return
        numbers = {
            k: v
            for k, v in row.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
        }
        self._server_log = training_client.log_metrics(numbers, step)

    def metrics(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.metrics_path)

    def record_checkpoint(self, record: CheckpointRecord) -> None:
        _append_jsonl(self.checkpoints_path, asdict(record))

    def last_checkpoint(self) -> CheckpointRecord | None:
        rows = [r for r in _read_jsonl(self.checkpoints_path) if r.get("state_path")]
        if not rows:
            return None
        row = rows[-1]
        return CheckpointRecord(
            name=row["name"],
            next_step=int(row["next_step"]),
            state_path=row["state_path"],
            sampler_path=row.get("sampler_path"),
            extra=row.get("extra") or {},
        )

    def truncate_metrics(self, next_step: int) -> None:
        """Drop metrics rows of steps >= `next_step` (they will be logged again after resuming)."""
        rows = self.metrics()
        kept = [r for r in rows if int(r.get("step", -1)) < next_step]
        if len(kept) == len(rows):
            return
        backup = self.log_dir / f"{METRICS_FILE}.pre_resume_{next_step:06d}"
        self.metrics_path.replace(backup)
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.metrics_path)

    def close(self) -> None:
        if self._server_log is not None:  # the last step's metrics reach the server before the run ends
            try:
                failure = self._server_log.exception(timeout=30)
            except Exception as exc:  # noqa: BLE001 - a timeout: the run itself is done
                failure = exc
            if failure is not None and self._to_server:
                log.warning("the server refused logged metrics (%s)", failure)
            self._server_log = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(project: str | None, name: str | None, log_dir: Path) -> Any:
    """A wandb run when a project is configured and wandb is installed; otherwise None, with a note."""
    if not project:
        return None
    try:
        import wandb
    except ImportError:
        log.warning("wandb_project is set but wandb is not installed; logging to %s only", log_dir)
        return None
    return wandb.init(project=project, name=name, dir=str(log_dir))
