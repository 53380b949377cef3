"""The control plane's record of trainer jobs: one catalogue row per (owner, job id).

Rows live in the control plane's catalogue (table `trainer_jobs`, alembic `0005_trainer_jobs`) so a
restarted control plane still knows every job, its state and why it is in it. Every lookup takes the
owner: another key's job reads as missing (404), and each owner has its own id namespace. Tombstones
(DELETED) stay until the retention period ends, then `purge` removes them. It knows nothing of
processes or HTTP.
"""

from __future__ import annotations

import builtins
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, DateTime, Float, Integer, String, select, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Mapped, mapped_column

from tether.server.catalogue import Base, Catalogue, rowcount, utcnow
from tether.types.errors import NotFoundError
from tether.types.wire_jobs import JobState, TrainerJobConfig


class TrainerJobRow(Base):
    __tablename__ = "trainer_jobs"
    owner: Mapped[str] = mapped_column(String, primary_key=True)
    job_id: Mapped[str] = mapped_column(String, primary_key=True)
    state: Mapped[str] = mapped_column(String, index=True)
    """A `JobState` value."""
    reason: Mapped[str | None] = mapped_column(String, nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The `TrainerJobConfig` as asked for (JSON)."""
    launcher: Mapped[str] = mapped_column(String)
    restart_count: Mapped[int] = mapped_column(Integer, default=0)
    url: Mapped[str | None] = mapped_column(String, nullable=True)
    """The process's own base URL while it runs."""
    model_load_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    launched_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_activity_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    @property
    def job_state(self) -> JobState:
        return JobState(self.state)

    @property
    def job_config(self) -> TrainerJobConfig:
        return TrainerJobConfig.model_validate(self.config)


class JobStore:
    """Typed reads and writes of `trainer_jobs` on a `Catalogue` (thread-safe, like the catalogue)."""

    def __init__(self, catalogue: Catalogue) -> None:
        self._catalogue = catalogue

    def insert(
        self, owner: str, job_id: str, config: TrainerJobConfig, launcher: str
    ) -> TrainerJobRow | None:
        """Insert a CREATING row atomically; None if the id is new (this call claimed it), else the
        row that already holds it (idempotent create: the UNIQUE key decides, not a Python lock)."""
        now = utcnow()
        values = dict(
            owner=owner,
            job_id=job_id,
            state=JobState.CREATING.value,
            reason=None,
            config=config.model_dump(mode="json"),
            launcher=launcher,
            restart_count=0,
            created_at=now,
            updated_at=now,
            last_activity_at=now,
        )
        statement = (
            sqlite_insert(TrainerJobRow)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["owner", "job_id"])
        )
        with self._catalogue.writing() as s:
            if rowcount(s.execute(statement)) == 1:
                return None
        return self.find(owner, job_id)

    def find(self, owner: str, job_id: str) -> TrainerJobRow | None:
        with self._catalogue.reading() as s:
            return s.get(TrainerJobRow, (owner, job_id))

    def get(self, owner: str, job_id: str) -> TrainerJobRow:
        row = self.find(owner, job_id)
        if row is None:
            raise NotFoundError(f"unknown trainer job {job_id!r}")
        return row

    def list(self, owner: str, *, include_deleted: bool = False) -> builtins.list[TrainerJobRow]:
        """The owner's jobs, newest first; tombstones only with `include_deleted`."""
        query = select(TrainerJobRow).where(TrainerJobRow.owner == owner)
        if not include_deleted:
            query = query.where(TrainerJobRow.state != JobState.DELETED.value)
        with self._catalogue.reading() as s:
            return list(s.scalars(query.order_by(TrainerJobRow.created_at.desc(), TrainerJobRow.job_id)))

    def in_states(self, states: set[JobState]) -> builtins.list[TrainerJobRow]:
        """Every owner's jobs in `states` (the monitor's worklist)."""
        query = select(TrainerJobRow).where(TrainerJobRow.state.in_([s.value for s in states]))
        with self._catalogue.reading() as s:
            return list(s.scalars(query))

    def update(self, owner: str, job_id: str, *, expect: set[JobState] | None = None, **values: Any) -> bool:
        """Set `values` (and `updated_at`); with `expect`, only if the job is in one of those states
        (compare-and-set, so a monitor tick and a request never both move one job). True if changed."""
        if "state" in values and isinstance(values["state"], JobState):
            values["state"] = values["state"].value
        query = update(TrainerJobRow).where(TrainerJobRow.owner == owner, TrainerJobRow.job_id == job_id)
        if expect is not None:
            query = query.where(TrainerJobRow.state.in_([s.value for s in expect]))
        with self._catalogue.writing() as s:
            return rowcount(s.execute(query.values(updated_at=utcnow(), **values))) == 1

    def touch(self, activity: dict[tuple[str, str], datetime]) -> None:
        """Record the latest activity of several jobs in one transaction (never moves a time back)."""
        if not activity:
            return
        with self._catalogue.writing() as s:
            for (owner, job_id), when in activity.items():
                s.execute(
                    update(TrainerJobRow)
                    .where(
                        TrainerJobRow.owner == owner,
                        TrainerJobRow.job_id == job_id,
                        (TrainerJobRow.last_activity_at.is_(None)) | (TrainerJobRow.last_activity_at < when),
                    )
                    .values(last_activity_at=when)
                )

    def expired_tombstones(
        self, retention_s: float, *, now: datetime | None = None
    ) -> builtins.list[TrainerJobRow]:
        cutoff = (now or utcnow()) - timedelta(seconds=retention_s)
        query = select(TrainerJobRow).where(
            TrainerJobRow.state == JobState.DELETED.value, TrainerJobRow.deleted_at < cutoff
        )
        with self._catalogue.reading() as s:
            return list(s.scalars(query))

    def purge(self, owner: str, job_id: str) -> None:
        from sqlalchemy import delete

        with self._catalogue.writing() as s:
            s.execute(
                delete(TrainerJobRow).where(TrainerJobRow.owner == owner, TrainerJobRow.job_id == job_id)
            )
