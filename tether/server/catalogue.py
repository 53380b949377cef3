"""The durable catalogue: sessions, training runs, checkpoints and samplers, in SQLite via SQLAlchemy.

Everything a restarted server must still know lives here (checkpoint files live in the data
directory; this only indexes them). Every row has an owner; lookups take the owner and treat another
owner's rows as missing, so isolation cannot be forgotten at a call site.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import JSON, Boolean, DateTime, Integer, String, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tether.types.errors import NotFoundError


def utcnow() -> datetime:
    """Naive UTC: SQLite stores no time zone, so every stored time is UTC by convention."""
    return datetime.now(UTC).replace(tzinfo=None)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite drops tz info; every stored time is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class SessionRow(Base):
    __tablename__ = "sessions"
    session_id: Mapped[str] = mapped_column(String, primary_key=True)
    owner: Mapped[str] = mapped_column(String, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    last_heartbeat: Mapped[datetime] = mapped_column(DateTime)
    status: Mapped[str] = mapped_column(String, default="active")
    """active | finished | expired."""
    tags: Mapped[list[str]] = mapped_column(default=list)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    display_name: Mapped[str | None] = mapped_column(String, nullable=True)
    project_id: Mapped[str | None] = mapped_column(String, nullable=True)


class TrainingRunRow(Base):
    __tablename__ = "training_runs"
    run_id: Mapped[str] = mapped_column(String, primary_key=True)
    session_id: Mapped[str] = mapped_column(String, index=True)
    owner: Mapped[str] = mapped_column(String, index=True)
    base_model: Mapped[str] = mapped_column(String)
    is_lora: Mapped[bool] = mapped_column(Boolean)
    lora_rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    lora_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    last_request_time: Mapped[datetime] = mapped_column(DateTime)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    run_id: Mapped[str] = mapped_column(String, primary_key=True)
    checkpoint_id: Mapped[str] = mapped_column(String, primary_key=True)
    """"weights/<name>", "sampler_weights/<name>" or "external_weights/<name>"."""
    owner: Mapped[str] = mapped_column(String, index=True)
    checkpoint_type: Mapped[str] = mapped_column(String)
    """training | sampler | external."""
    directory: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    size_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)

    @property
    def tinker_path(self) -> str:
        return f"tinker://{self.run_id}/{self.checkpoint_id}"


class SamplerRow(Base):
    __tablename__ = "samplers"
    sampler_id: Mapped[str] = mapped_column(String, primary_key=True)
    session_id: Mapped[str] = mapped_column(String, index=True)
    owner: Mapped[str] = mapped_column(String, index=True)
    base_model: Mapped[str] = mapped_column(String)
    model_path: Mapped[str | None] = mapped_column(String, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)


_Row = TypeVar("_Row", SessionRow, TrainingRunRow, SamplerRow)


class Catalogue:
    """Typed access to the state database; safe to call from any thread."""

    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._engine = create_engine(f"sqlite:///{db_path}", connect_args={"check_same_thread": False})

        @event.listens_for(self._engine, "connect")
        def _pragmas(conn, _record) -> None:  # WAL: readers never block the writer
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=5000")

        Base.metadata.create_all(self._engine)
        self._write_lock = threading.Lock()

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._write_lock, Session(self._engine, expire_on_commit=False) as session, session.begin():
            yield session

    def _get_owned(self, row_type: type[_Row], key: str, owner: str, what: str) -> _Row:
        """The row under `key`, or NotFoundError when it is missing or another owner's."""
        with self._tx() as s:
            row = s.get(row_type, key)
        if row is None or row.owner != owner:
            raise NotFoundError(f"unknown {what} {key!r}")
        return row

    def _update(self, row_type: type[Base], key: Any, **values: Any) -> None:
        """Set `values` on the row under `key`; nothing when there is none."""
        with self._tx() as s:
            row = s.get(row_type, key)
            if row is not None:
                for name, value in values.items():
                    setattr(row, name, value)

    def _page(self, query: Any, created_at: Any, limit: int, offset: int) -> tuple[list[Any], int]:
        """One page of `query`'s rows, newest first, and the total count."""
        with self._tx() as s:
            total = len(list(s.scalars(query)))
            rows = list(s.scalars(query.order_by(created_at.desc()).limit(limit).offset(offset)))
        return rows, total

    # sessions
    def create_session(self, session_id: str, owner: str, *, tags: list[str], user_metadata: dict,
                       display_name: str | None, project_id: str | None) -> SessionRow:
        now = utcnow()
        row = SessionRow(session_id=session_id, owner=owner, created_at=now, last_heartbeat=now, status="active",
                         tags=tags, user_metadata=user_metadata, display_name=display_name, project_id=project_id)
        with self._tx() as s:
            s.add(row)
        return row

    def get_session(self, session_id: str, owner: str) -> SessionRow:
        return self._get_owned(SessionRow, session_id, owner, "session")

    def heartbeat(self, session_id: str, owner: str) -> bool:
        """Record a heartbeat; False if the session is unknown, not the owner's, or no longer active."""
        with self._tx() as s:
            row = s.get(SessionRow, session_id)
            if row is None or row.owner != owner or row.status != "active":
                return False
            row.last_heartbeat = utcnow()
            return True

    def set_session_status(self, session_id: str, status: str) -> None:
        self._update(SessionRow, session_id, status=status)

    def set_session_project(self, session_id: str, project_id: str) -> None:
        self._update(SessionRow, session_id, project_id=project_id)

    def list_sessions(self, owner: str, limit: int, offset: int) -> list[SessionRow]:
        with self._tx() as s:
            q = select(SessionRow).where(SessionRow.owner == owner).order_by(SessionRow.created_at.desc())
            return list(s.scalars(q.limit(limit).offset(offset)))

    def stale_sessions(self, older_than_s: float, *, now: datetime | None = None) -> list[str]:
        """Active sessions whose last heartbeat is older than `older_than_s`."""
        cutoff = (now or utcnow()) - timedelta(seconds=older_than_s)
        with self._tx() as s:
            q = select(SessionRow.session_id).where(SessionRow.status == "active", SessionRow.last_heartbeat < cutoff)
            return list(s.scalars(q))

    def expire_active_sessions(self) -> None:
        """At startup: sessions of a previous process have no live models any more."""
        with self._tx() as s:
            for row in s.scalars(select(SessionRow).where(SessionRow.status == "active")):
                row.status = "expired"

    # training runs
    def add_training_run(self, run_id: str, session_id: str, owner: str, *, base_model: str, is_lora: bool,
                         lora_rank: int | None, lora_config: dict, user_metadata: dict) -> TrainingRunRow:
        now = utcnow()
        row = TrainingRunRow(run_id=run_id, session_id=session_id, owner=owner, base_model=base_model,
                             is_lora=is_lora, lora_rank=lora_rank, lora_config=lora_config,
                             user_metadata=user_metadata, created_at=now, last_request_time=now)
        with self._tx() as s:
            s.merge(row)
        return row

    def get_training_run(self, run_id: str, owner: str) -> TrainingRunRow:
        return self._get_owned(TrainingRunRow, run_id, owner, "training run")

    def touch_training_run(self, run_id: str) -> None:
        self._update(TrainingRunRow, run_id, last_request_time=utcnow())

    def list_training_runs(self, owner: str, limit: int, offset: int) -> tuple[list[TrainingRunRow], int]:
        query = select(TrainingRunRow).where(TrainingRunRow.owner == owner)
        return self._page(query, TrainingRunRow.created_at, limit, offset)

    def runs_of_session(self, session_id: str) -> list[str]:
        with self._tx() as s:
            return list(s.scalars(select(TrainingRunRow.run_id).where(TrainingRunRow.session_id == session_id)))

    # checkpoints
    def add_checkpoint(self, run_id: str, checkpoint_id: str, owner: str, *, checkpoint_type: str,
                       directory: str, size_bytes: int | None, ttl_seconds: int | None,
                       user_metadata: dict) -> CheckpointRow:
        now = utcnow()
        expires = now + timedelta(seconds=ttl_seconds) if ttl_seconds else None
        row = CheckpointRow(run_id=run_id, checkpoint_id=checkpoint_id, owner=owner, checkpoint_type=checkpoint_type,
                            directory=directory, created_at=now, expires_at=expires, size_bytes=size_bytes,
                            public=False, user_metadata=user_metadata)
        with self._tx() as s:
            s.merge(row)
        return row

    def find_checkpoint(self, run_id: str, checkpoint_id: str) -> CheckpointRow | None:
        """Owner-blind lookup (for conflict checks before writing)."""
        with self._tx() as s:
            return s.get(CheckpointRow, (run_id, checkpoint_id))

    def get_checkpoint(self, run_id: str, checkpoint_id: str, owner: str) -> CheckpointRow:
        row = self.find_checkpoint(run_id, checkpoint_id)
        if row is None or not (row.owner == owner or row.public):
            raise NotFoundError(f"unknown checkpoint tinker://{run_id}/{checkpoint_id}")
        return row

    def list_checkpoints(self, owner: str, run_id: str | None = None, limit: int = 1000,
                         offset: int = 0) -> tuple[list[CheckpointRow], int]:
        query = select(CheckpointRow).where(CheckpointRow.owner == owner)
        if run_id is not None:
            query = query.where(CheckpointRow.run_id == run_id)
        return self._page(query, CheckpointRow.created_at, limit, offset)

    def delete_checkpoint(self, run_id: str, checkpoint_id: str) -> None:
        with self._tx() as s:
            row = s.get(CheckpointRow, (run_id, checkpoint_id))
            if row is not None:
                s.delete(row)

    def update_checkpoint(self, run_id: str, checkpoint_id: str, **values: Any) -> None:
        self._update(CheckpointRow, (run_id, checkpoint_id), **values)

    def expired_checkpoints(self, *, now: datetime | None = None) -> list[CheckpointRow]:
        now = now or utcnow()
        with self._tx() as s:
            q = select(CheckpointRow).where(CheckpointRow.expires_at.is_not(None), CheckpointRow.expires_at <= now)
            return list(s.scalars(q))

    # samplers
    def add_sampler(self, sampler_id: str, session_id: str, owner: str, *, base_model: str,
                    model_path: str | None) -> SamplerRow:
        row = SamplerRow(sampler_id=sampler_id, session_id=session_id, owner=owner, base_model=base_model,
                         model_path=model_path, created_at=utcnow())
        with self._tx() as s:
            s.merge(row)
        return row

    def get_sampler(self, sampler_id: str, owner: str) -> SamplerRow:
        return self._get_owned(SamplerRow, sampler_id, owner, "sampler")

    def samplers_of_session(self, session_id: str) -> list[str]:
        with self._tx() as s:
            return list(s.scalars(select(SamplerRow.sampler_id).where(SamplerRow.session_id == session_id)))


def as_utc(value: datetime | None) -> datetime | None:
    """A stored time as an aware UTC datetime (for JSON answers)."""
    return _aware(value)
