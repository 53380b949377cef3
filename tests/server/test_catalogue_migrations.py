"""The catalogue's alembic migrations: old databases upgrade on open, fresh ones match the models."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

import tether.jobs.store  # noqa: F401 - every module with a table registers it on Base
import tether.server.deployments  # noqa: F401  (tables of other modules share the catalogue's metadata)
import tether.server.run_metrics  # noqa: F401
from tether.server.catalogue import MIGRATIONS_DIR, Base, Catalogue, head_revision

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


def test_opening_a_new_file_another_connection_is_writing_waits_to_switch_it_to_wal(tmp_path):
    """SQLite refuses the switch to WAL at once, without its busy handler, while another connection
    holds the write lock of a rollback-journal file (as a second opener of a new file may): the
    catalogue retries it instead of failing (this raced in CI with 4 openers of one new file)."""
    import threading

    db = tmp_path / "tether.db"
    writer = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE other (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO other VALUES (1)")
    commit = threading.Timer(0.3, writer.execute, ["COMMIT"])
    commit.start()
    try:
        Catalogue(db).close()
    finally:
        commit.join()
        writer.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT x FROM other").fetchall() == [(1,)]


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


def _database_at(db: Path, revision: str) -> None:
    """A database migrated only up to `revision` (as an older tether left it)."""
    from alembic import command
    from alembic.config import Config

    from tether.server.catalogue import _open_engine

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    engine = _open_engine(db)
    with engine.execution_options(tether_begin="BEGIN IMMEDIATE").begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    engine.dispose()
    assert _revision(db) == [(revision,)]


def test_migration_files_are_named_after_their_revisions_in_chain_order():
    """What `head_revision` relies on to find the head without loading the scripts."""
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    chain = [r for r in script.walk_revisions()][::-1]  # 0001_initial first
    assert [Path(r.path).stem for r in chain] == [r.revision for r in chain]
    assert [r.revision for r in chain] == sorted(r.revision for r in chain)
    assert head_revision() == script.get_current_head() == chain[-1].revision


def test_an_old_revision_database_upgrades_to_head_and_keeps_its_rows(tmp_path):
    db = tmp_path / "tether.db"
    _database_at(db, "0003_run_metrics")
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO sessions (session_id, owner, created_at, last_heartbeat, status, tags,"
            " user_metadata) VALUES ('s', 'alice', '2026-01-01', '2026-01-01', 'active', '[]', '{}')"
        )
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "trainer_jobs" not in tables
    catalogue = Catalogue(db)
    assert catalogue.get_session("s", "alice").owner == "alice"
    catalogue.close()
    assert _revision(db) == [(_head(),)]
    with sqlite3.connect(db) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "trainer_jobs" in tables


def test_opening_a_database_at_head_runs_no_migration(tmp_path, monkeypatch):
    from tether.server import catalogue as catalogue_module

    calls = []
    migrate = catalogue_module._migrate
    monkeypatch.setattr(catalogue_module, "_migrate", lambda writer: (calls.append(1), migrate(writer)))
    fresh, old = tmp_path / "fresh.db", tmp_path / "old.db"
    Catalogue(fresh).close()
    assert len(calls) == 1
    Catalogue(fresh).close()  # at head: skipped
    assert len(calls) == 1
    _database_at(old, "0004_deployments")
    Catalogue(old).close()  # behind: upgraded
    assert len(calls) == 2 and _revision(old) == [(_head(),)]
    Catalogue(old).close()
    assert len(calls) == 2


def test_opening_a_database_at_head_does_not_import_alembic(tmp_path):
    db = tmp_path / "tether.db"
    Catalogue(db).close()
    code = (
        "import sys\nfrom pathlib import Path\nfrom tether.server.catalogue import Catalogue\n"
        f"Catalogue(Path({str(db)!r})).close()\nprint(sorted(m for m in sys.modules if m.startswith('alembic')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
