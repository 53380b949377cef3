"""The catalogue's alembic migrations: old databases upgrade on open, fresh ones match the models."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

import tether.jobs.store  # noqa: F401 - every module with a table registers it on Base
import tether.server.deployments  # noqa: F401  (tables of other modules share the catalogue's metadata)
import tether.server.run_metrics  # noqa: F401
from tether.server.catalogue import MIGRATIONS_DIR, Base, Catalogue

FIXTURE = Path(__file__).parent / "fixtures" / "catalogue_v0.db"


def _revision(db: Path) -> list[tuple[str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT version_num FROM alembic_version").fetchall()


def _head() -> str:
    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


def test_database_written_before_migrations_upgrades_and_keeps_its_rows(tmp_path):
    with sqlite3.connect(FIXTURE) as conn:  # the fixture really is pre-alembic
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "alembic_version" not in tables and "sessions" in tables
    db = tmp_path / "tether.db"
    shutil.copy(FIXTURE, db)

    catalogue = Catalogue(db)
    runs, total = catalogue.list_training_runs("alice", limit=10, offset=0)
    assert total == 1 and [r.run_id for r in runs] == ["run-1"]
    assert runs[0].lora_rank == 4 and runs[0].user_metadata == {"note": "fixture"}
    checkpoints, count = catalogue.list_checkpoints("alice", run_id="run-1")
    assert count == 2
    assert sorted(c.tinker_path for c in checkpoints) == [
        "tinker://run-1/sampler_weights/step-1",
        "tinker://run-1/weights/step-1",
    ]
    assert catalogue.get_session("sess-1", "alice").display_name == "demo"
    assert catalogue.claim_idempotency_key("copy:alice", "k", "v") is None  # the new table exists
    catalogue.close()
    assert _revision(db) == [(_head(),)]

    reopened = Catalogue(db)  # opening an up-to-date database changes nothing
    assert (
        reopened.list_checkpoints("alice")[1] == 2
        and reopened.claim_idempotency_key("copy:alice", "k", "w") == "v"
    )
    reopened.close()
    assert _revision(db) == [(_head(),)]


def test_fresh_database_is_at_head_and_matches_the_models(tmp_path):
    db = tmp_path / "tether.db"
    Catalogue(db).close()
    assert _revision(db) == [(_head(),)]
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"the migrations and the models in catalogue.py disagree: {diff}"


def test_migration_chain_is_linear_from_0001_initial():
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    revisions = [r.revision for r in script.walk_revisions()]  # head first
    assert len(script.get_heads()) == 1 and revisions[-1] == "0001_initial"
    assert revisions[-2] == "0002_idempotency_keys"


def test_database_is_in_wal_mode(tmp_path):
    db = tmp_path / "tether.db"
    Catalogue(db).close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_catalogues_opening_one_new_file_at_once_migrate_it_once(tmp_path):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    db, start = tmp_path / "tether.db", threading.Barrier(4)

    def open_and_write(i: int) -> int:
        start.wait()
        catalogue = Catalogue(db)
        catalogue.create_session(
            f"s{i}", "alice", tags=[], user_metadata={}, display_name=None, project_id=None
        )
        catalogue.close()
        return i

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(open_and_write, range(4))) == [0, 1, 2, 3]
    assert _revision(db) == [(_head(),)]
    assert len(Catalogue(db).list_sessions("alice", 10, 0)) == 4
