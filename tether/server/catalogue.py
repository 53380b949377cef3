"""The durable catalogue: sessions, training runs, checkpoints, samplers and idempotency keys, in SQLite.

Everything a restarted server must still know lives here (checkpoint files live in the data
directory; this only indexes them). Every row has an owner; lookups take the owner and treat another
owner's rows as missing, so isolation cannot be forgotten at a call site.

The schema is versioned by alembic (`tether/server/migrations/`): opening a catalogue upgrades its
database to the newest revision, including a database written before migrations existed; a database
already there is recognised with one plain read (alembic is not even imported). SQLite runs
in WAL mode; reads are plain (deferred) transactions that never wait for writers, writes are
`BEGIN IMMEDIATE` transactions serialized by SQLite itself, so several `Catalogue` objects (or
processes) may share one file. It knows nothing of HTTP, models or checkpoint files.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast, overload

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, CursorResult, Engine, Result
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column
from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential

from tether.types.errors import NotFoundError

log = logging.getLogger("tether.server")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
LEGACY_REVISION = "0001_initial"
"""The schema of databases written before alembic (they have tables but no `alembic_version`)."""
BUSY_TIMEOUT_MS = 10_000
"""How long a write waits for another connection's write transaction before failing."""
TOUCH_INTERVAL_S = 1.0
"""How often at most a training run's `last_request_time` is written (`Catalogue.touch_training_run`)."""


def utcnow() -> datetime:
    """Naive UTC: SQLite stores no time zone, so every stored time is UTC by convention."""
    return datetime.now(UTC).replace(tzinfo=None)


def rowcount(result: Result[Any]) -> int:
    """Rows a DML statement matched: `Session.execute` is typed `Result`, DML answers a `CursorResult`."""
    return cast("CursorResult[Any]", result).rowcount


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


class IdempotencyKeyRow(Base):
    """One durable answer per (scope, key): e.g. scope "copy:<owner>", key an X-Idempotency-Key."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("scope", "key", name="uq_idempotency_keys_scope_key"),)
    __mapper_args__ = {"primary_key": ["scope", "key"]}
    scope: Mapped[str] = mapped_column(String)
    key: Mapped[str] = mapped_column(String)
    value: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime)


_Row = TypeVar("_Row", SessionRow, TrainingRunRow, SamplerRow)


def _open_engine(db_path: Path) -> Engine:
    """An engine whose transactions begin explicitly: `BEGIN` for reads, `BEGIN IMMEDIATE` for writes.

    pysqlite's own transaction handling is switched off (it would begin lazily and commit before DDL),
    as the SQLAlchemy SQLite dialect documents; a connection's `tether_begin` execution option names
    the BEGIN it emits.
    """
    engine = create_engine(f"sqlite:///{db_path}", connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None
        dbapi_conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        _use_wal(dbapi_conn)

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("tether_begin", "BEGIN"))

    return engine


def _is_locked(error: BaseException) -> bool:
    return isinstance(error, sqlite3.OperationalError) and "database is locked" in str(error)


@retry(
    retry=retry_if_exception(_is_locked),
    wait=wait_random_exponential(multiplier=0.005, max=0.2),
    stop=stop_after_delay(BUSY_TIMEOUT_MS / 1000),
    reraise=True,
)
def _use_wal(dbapi_conn: sqlite3.Connection) -> None:
    """Put the database in WAL mode (readers never block on the writer, nor it on them), unless it is.

    The mode is stored in the file, so only a new database is switched. Switching takes an exclusive
    lock without SQLite's busy handler, so connections opening one new file at once get
    `SQLITE_BUSY` at once: they retry (with jitter) for up to `BUSY_TIMEOUT_MS`, then raise
    `sqlite3.OperationalError`.
    """
    if dbapi_conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        dbapi_conn.execute("PRAGMA journal_mode=WAL")


def head_revision() -> str:
    """The newest migration's revision, without loading the migration scripts: each file in
    `migrations/versions` is named after its revision and the names sort in chain order
    (`tests/server/test_catalogue_migrations.py` holds alembic to both)."""
    return max(path.stem for path in (MIGRATIONS_DIR / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))


def _at_head(engine: Engine) -> bool:
    """Whether the database's `alembic_version` is the newest revision: a read with plain SQL, so
    opening an up-to-date database (every restart, every job process) never imports alembic."""
    with engine.connect() as conn:
        has_table = conn.exec_driver_sql(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
        ).first()
        if has_table is None:
            return False
        versions = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    return [tuple(row) for row in versions] == [(head_revision(),)]


def _migrate(writer: Engine) -> None:
    """Upgrade the database to the newest revision, in one write transaction (so concurrent openers
    of one file take turns). A database written before migrations existed is stamped first."""
    if logging.getLogger("alembic").level == logging.NOTSET:  # its INFO chatter, unless asked for
        logging.getLogger("alembic").setLevel(logging.WARNING)
    from alembic import command
    from alembic.config import Config
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    with writer.begin() as conn:
        config.attributes["connection"] = conn
        tables = inspect(conn)
        if not tables.has_table("alembic_version") and tables.has_table(SessionRow.__tablename__):
            command.stamp(config, LEGACY_REVISION)
        current = MigrationContext.configure(conn).get_current_revision()
        if current != head:
            log.info("catalogue %s: upgrading its schema from %s to %s", writer.url.database, current, head)
            command.upgrade(config, "head")


class Catalogue:
    """Typed access to the state database; safe to call from any thread, and beside other `Catalogue`s
    (or processes) on the same file.

    Raises `sqlalchemy.exc.OperationalError` when the database is locked longer than
    `BUSY_TIMEOUT_MS` or cannot be opened.
    """

    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._engine = _open_engine(db_path)
        self._writer = self._engine.execution_options(tether_begin="BEGIN IMMEDIATE")
        if not _at_head(self._engine):
            _migrate(self._writer)
        self._write_lock = threading.Lock()
        """Orders this object's writers among themselves (SQLite would too, by busy-waiting)."""
        self._touch_lock = threading.Lock()
        self._touches: dict[str, datetime] = {}
        """Runs' newest `last_request_time`s not written yet (see `touch_training_run`)."""
        self._touch_written: dict[str, float] = {}
        """When (`time.monotonic()`) each run's `last_request_time` was last written."""

    def close(self) -> None:
        self.flush_touches()
        self._engine.dispose()

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read transaction: a consistent snapshot that waits for no writer."""
        with Session(self._engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def writing(self) -> Iterator[Session]:
        """A write transaction (`BEGIN IMMEDIATE`): it holds SQLite's write lock from its first statement."""
        with self._write_lock, Session(self._writer, expire_on_commit=False) as session, session.begin():
            yield session

    def _get_owned(self, row_type: type[_Row], key: str, owner: str, what: str) -> _Row:
        """The row under `key`, or NotFoundError when it is missing or another owner's."""
        with self.reading() as s:
            row = s.get(row_type, key)
        if row is None or row.owner != owner:
            raise NotFoundError(f"unknown {what} {key!r}")
        return row

    def _update(self, row_type: type[Base], key: Any, **values: Any) -> int:
        """Set `values` on the row under primary key `key` (a tuple for composite keys); the rows changed."""
        columns = inspect(row_type).primary_key
        keys = key if isinstance(key, tuple) else (key,)
        with self.writing() as s:
            where = [column == value for column, value in zip(columns, keys, strict=True)]
            return rowcount(s.execute(update(row_type).where(*where).values(**values)))

    def _page(self, query: Any, order_by: Sequence[Any], limit: int, offset: int) -> tuple[list[Any], int]:
        """One page of `query`'s rows in `order_by` order, and the total count (SQL COUNT, one snapshot)."""
        with self.reading() as s:
            total = s.scalar(select(func.count()).select_from(query.subquery()))
            rows = list(s.scalars(query.order_by(*order_by).limit(limit).offset(offset)))
        return rows, int(total or 0)

    # sessions
    def create_session(
        self,
        session_id: str,
        owner: str,
        *,
        tags: list[str],
        user_metadata: dict,
        display_name: str | None,
        project_id: str | None,
    ) -> SessionRow:
        now = utcnow()
        row = SessionRow(
            session_id=session_id,
            owner=owner,
            created_at=now,
            last_heartbeat=now,
            status="active",
            tags=tags,
            user_metadata=user_metadata,
            display_name=display_name,
            project_id=project_id,
        )
        with self.writing() as s:
            s.add(row)
        return row

    def get_session(self, session_id: str, owner: str) -> SessionRow:
        return self._get_owned(SessionRow, session_id, owner, "session")

    def heartbeat(self, session_id: str, owner: str) -> bool:
        """Record a heartbeat; False if the session is unknown, not the owner's, or no longer active."""
        with self.writing() as s:
            q = (
                update(SessionRow)
                .where(
                    SessionRow.session_id == session_id,
                    SessionRow.owner == owner,
                    SessionRow.status == "active",
                )
                .values(last_heartbeat=utcnow())
            )
            return rowcount(s.execute(q)) == 1

    def set_session_status(self, session_id: str, status: str) -> None:
        self._update(SessionRow, session_id, status=status)

    def set_session_project(self, session_id: str, project_id: str) -> None:
        self._update(SessionRow, session_id, project_id=project_id)

    def list_sessions(self, owner: str, limit: int, offset: int) -> list[SessionRow]:
        with self.reading() as s:
            q = (
                select(SessionRow)
                .where(SessionRow.owner == owner)
                .order_by(SessionRow.created_at.desc(), SessionRow.session_id.desc())
            )
            return list(s.scalars(q.limit(limit).offset(offset)))

    def stale_sessions(self, older_than_s: float, *, now: datetime | None = None) -> list[str]:
        """Active sessions whose last heartbeat is older than `older_than_s`."""
        cutoff = (now or utcnow()) - timedelta(seconds=older_than_s)
        with self.reading() as s:
            q = select(SessionRow.session_id).where(
                SessionRow.status == "active", SessionRow.last_heartbeat < cutoff
            )
            return list(s.scalars(q))

    def expire_active_sessions(self) -> None:
        """At startup: sessions of a previous process have no live models any more."""
        with self.writing() as s:
            s.execute(update(SessionRow).where(SessionRow.status == "active").values(status="expired"))

    # training runs
    def add_training_run(
        self,
        run_id: str,
        session_id: str,
        owner: str,
        *,
        base_model: str,
        is_lora: bool,
        lora_rank: int | None,
        lora_config: dict,
        user_metadata: dict,
    ) -> TrainingRunRow:
        now = utcnow()
        row = TrainingRunRow(
            run_id=run_id,
            session_id=session_id,
            owner=owner,
            base_model=base_model,
            is_lora=is_lora,
            lora_rank=lora_rank,
            lora_config=lora_config,
            user_metadata=user_metadata,
            created_at=now,
            last_request_time=now,
        )
        with self.writing() as s:
            s.merge(row)
        return row

    def get_training_run(self, run_id: str, owner: str) -> TrainingRunRow:
        self.flush_touches()
        return self._get_owned(TrainingRunRow, run_id, owner, "training run")

    def touch_training_run(self, run_id: str) -> None:
        """Set the run's `last_request_time` to now.

        Written at most once per `TOUCH_INTERVAL_S` per run (a training step must not cost a
        database commit); a newer time waits in memory until then, or until a read of training runs
        (`get_training_run`, `list_training_runs`) or `close` writes it first, so readers always see
        the newest time. A crash loses at most the last `TOUCH_INTERVAL_S`."""
        now = time.monotonic()
        with self._touch_lock:
            self._touches[run_id] = utcnow()
            if now - self._touch_written.get(run_id, float("-inf")) < TOUCH_INTERVAL_S:
                return
        self.flush_touches()

    def flush_touches(self) -> None:
        """Write the training runs' `last_request_time`s waiting in memory (one transaction)."""
        with self._touch_lock:
            if not self._touches:
                return
            touches, self._touches = self._touches, {}
            now = time.monotonic()
            for run_id in touches:
                self._touch_written[run_id] = now
        with self.writing() as s:
            for run_id, when in touches.items():
                s.execute(
                    update(TrainingRunRow)
                    .where(TrainingRunRow.run_id == run_id)
                    .values(last_request_time=when)
                )

    def list_training_runs(self, owner: str, limit: int, offset: int) -> tuple[list[TrainingRunRow], int]:
        """One page of the owner's runs, newest first, and how many they have in all."""
        self.flush_touches()
        query = select(TrainingRunRow).where(TrainingRunRow.owner == owner)
        return self._page(
            query, (TrainingRunRow.created_at.desc(), TrainingRunRow.run_id.desc()), limit, offset
        )

    def runs_of_session(self, session_id: str) -> list[str]:
        with self.reading() as s:
            return list(
                s.scalars(select(TrainingRunRow.run_id).where(TrainingRunRow.session_id == session_id))
            )

    # checkpoints
    def add_checkpoint(
        self,
        run_id: str,
        checkpoint_id: str,
        owner: str,
        *,
        checkpoint_type: str,
        directory: str,
        size_bytes: int | None,
        ttl_seconds: int | None,
        user_metadata: dict,
    ) -> CheckpointRow:
        now = utcnow()
        expires = now + timedelta(seconds=ttl_seconds) if ttl_seconds else None
        row = CheckpointRow(
            run_id=run_id,
            checkpoint_id=checkpoint_id,
            owner=owner,
            checkpoint_type=checkpoint_type,
            directory=directory,
            created_at=now,
            expires_at=expires,
            size_bytes=size_bytes,
            public=False,
            user_metadata=user_metadata,
        )
        with self.writing() as s:
            s.merge(row)
        return row

    def find_checkpoint(self, run_id: str, checkpoint_id: str) -> CheckpointRow | None:
        """Owner-blind lookup (for conflict checks before writing)."""
        with self.reading() as s:
            return s.get(CheckpointRow, (run_id, checkpoint_id))

    def get_checkpoint(self, run_id: str, checkpoint_id: str, owner: str) -> CheckpointRow:
        row = self.find_checkpoint(run_id, checkpoint_id)
        if row is None or not (row.owner == owner or row.public):
            raise NotFoundError(f"unknown checkpoint tinker://{run_id}/{checkpoint_id}")
        return row

    def all_checkpoints(self) -> list[CheckpointRow]:
        """Every checkpoint row of every owner (start-up reconciliation with the files on disk)."""
        with self.reading() as s:
            return list(s.scalars(select(CheckpointRow)))

    def list_checkpoints(
        self, owner: str, run_id: str | None = None, limit: int = 1000, offset: int = 0
    ) -> tuple[list[CheckpointRow], int]:
        """One page of the owner's checkpoints (of one run, or all), newest first, and the total count."""
        query = select(CheckpointRow).where(CheckpointRow.owner == owner)
        if run_id is not None:
            query = query.where(CheckpointRow.run_id == run_id)
        order = (
            CheckpointRow.created_at.desc(),
            CheckpointRow.run_id.desc(),
            CheckpointRow.checkpoint_id.desc(),
        )
        return self._page(query, order, limit, offset)

    def latest_checkpoints(self, owner: str, run_ids: Sequence[str]) -> dict[tuple[str, str], CheckpointRow]:
        """The newest checkpoint of each (run id, checkpoint type) among the owner's `run_ids`, in one query.

        Keys are `(run_id, checkpoint_type)`; a run without checkpoints of a type has no key for it.
        """
        if not run_ids:
            return {}
        rank = (
            func.row_number()
            .over(
                partition_by=(CheckpointRow.run_id, CheckpointRow.checkpoint_type),
                order_by=(CheckpointRow.created_at.desc(), CheckpointRow.checkpoint_id.desc()),
            )
            .label("rank")
        )
        ranked = (
            select(CheckpointRow, rank)
            .where(CheckpointRow.owner == owner, CheckpointRow.run_id.in_(list(run_ids)))
            .subquery()
        )
        newest = aliased(CheckpointRow, ranked)
        with self.reading() as s:
            rows = s.scalars(select(newest).where(ranked.c.rank == 1))
            return {(row.run_id, row.checkpoint_type): row for row in rows}

    def delete_checkpoint(self, run_id: str, checkpoint_id: str) -> None:
        with self.writing() as s:
            s.execute(
                delete(CheckpointRow).where(
                    CheckpointRow.run_id == run_id, CheckpointRow.checkpoint_id == checkpoint_id
                )
            )

    def update_checkpoint(self, run_id: str, checkpoint_id: str, **values: Any) -> None:
        self._update(CheckpointRow, (run_id, checkpoint_id), **values)

    def expired_checkpoints(self, *, now: datetime | None = None) -> list[CheckpointRow]:
        now = now or utcnow()
        with self.reading() as s:
            q = select(CheckpointRow).where(
                CheckpointRow.expires_at.is_not(None), CheckpointRow.expires_at <= now
            )
            return list(s.scalars(q))

    # samplers
    def add_sampler(
        self, sampler_id: str, session_id: str, owner: str, *, base_model: str, model_path: str | None
    ) -> SamplerRow:
        row = SamplerRow(
            sampler_id=sampler_id,
            session_id=session_id,
            owner=owner,
            base_model=base_model,
            model_path=model_path,
            created_at=utcnow(),
        )
        with self.writing() as s:
            s.merge(row)
        return row

    def get_sampler(self, sampler_id: str, owner: str) -> SamplerRow:
        return self._get_owned(SamplerRow, sampler_id, owner, "sampler")

    def samplers_of_session(self, session_id: str) -> list[str]:
        with self.reading() as s:
            return list(s.scalars(select(SamplerRow.sampler_id).where(SamplerRow.session_id == session_id)))

    # idempotency keys
    def claim_idempotency_key(self, scope: str, key: str, value: str) -> str | None:
        """Insert (scope, key) -> value atomically. None if this call claimed it; else the value stored earlier.

        Atomic across threads, `Catalogue` objects and processes sharing the file: the UNIQUE
        constraint on (scope, key) decides (INSERT ... ON CONFLICT DO NOTHING), not a Python lock.
        """
        insert = (
            sqlite_insert(IdempotencyKeyRow)
            .values(scope=scope, key=key, value=value, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["scope", "key"])
        )
        with self.writing() as s:
            if rowcount(s.execute(insert)) == 1:
                return None
            return s.scalar(
                select(IdempotencyKeyRow.value).where(
                    IdempotencyKeyRow.scope == scope, IdempotencyKeyRow.key == key
                )
            )

    def idempotency_value(self, scope: str, key: str) -> str | None:
        """The value stored under (scope, key), or None when the key is not claimed (a read; no lock)."""
        with self.reading() as s:
            return s.scalar(
                select(IdempotencyKeyRow.value).where(
                    IdempotencyKeyRow.scope == scope, IdempotencyKeyRow.key == key
                )
            )

    def set_idempotency_value(self, scope: str, key: str, value: str) -> None:
        """Replace the value of a claimed key (e.g. "pending" by the finished answer); nothing if unclaimed."""
        self._update(IdempotencyKeyRow, (scope, key), value=value)

    def replace_idempotency_value(self, scope: str, key: str, expected: str, value: str) -> bool:
        """Compare-and-set: store `value` only if the key still holds `expected`; True if it did.

        Lets exactly one of several callers take over a claim left behind (e.g. by a crashed process).
        """
        with self.writing() as s:
            q = (
                update(IdempotencyKeyRow)
                .where(
                    IdempotencyKeyRow.scope == scope,
                    IdempotencyKeyRow.key == key,
                    IdempotencyKeyRow.value == expected,
                )
                .values(value=value)
            )
            return rowcount(s.execute(q)) == 1

    def idempotency_keys_before(self, cutoff: datetime) -> list[tuple[str, str]]:
        """`(scope, key)` of every key claimed before `cutoff` (naive UTC), oldest first."""
        with self.reading() as s:
            rows = s.execute(
                select(IdempotencyKeyRow.scope, IdempotencyKeyRow.key)
                .where(IdempotencyKeyRow.created_at < cutoff)
                .order_by(IdempotencyKeyRow.created_at)
            )
            return [(scope, key) for scope, key in rows]

    def release_idempotency_key(self, scope: str, key: str) -> None:
        """Forget (scope, key), so the next claim succeeds (e.g. after the claimed work failed)."""
        with self.writing() as s:
            s.execute(
                delete(IdempotencyKeyRow).where(
                    IdempotencyKeyRow.scope == scope, IdempotencyKeyRow.key == key
                )
            )


@overload
def as_utc(value: datetime) -> datetime: ...


@overload
def as_utc(value: None) -> None: ...


def as_utc(value: datetime | None) -> datetime | None:
    """A stored time as an aware UTC datetime (for JSON answers)."""
    return _aware(value)
