"""Catalogue concurrency: durable idempotency keys under threads and two catalogues on one file,
reads that wait for no writer, and totals counted by SQL."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import event

from tether.server.catalogue import Catalogue


def _claim_all(catalogues: list[Catalogue], n: int, scope: str, key: str) -> list[str | None]:
    start = threading.Barrier(n)

    def claim(i: int) -> str | None:
        start.wait()
        return catalogues[i % len(catalogues)].claim_idempotency_key(scope, key, f"value-{i}")

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(claim, range(n)))


def test_sixteen_threads_claiming_one_key_get_exactly_one_none(tmp_path):
    catalogue = Catalogue(tmp_path / "tether.db")
    answers = _claim_all([catalogue], 16, "copy:alice", "k1")
    assert answers.count(None) == 1
    winner = f"value-{answers.index(None)}"
    assert all(a == winner for a in answers if a is not None)
    assert catalogue.idempotency_value("copy:alice", "k1") == winner


def test_two_catalogues_on_one_file_claim_a_key_once(tmp_path):
    first, second = Catalogue(tmp_path / "tether.db"), Catalogue(tmp_path / "tether.db")
    answers = _claim_all([first, second], 16, "copy:alice", "k2")
    assert answers.count(None) == 1
    winner = f"value-{answers.index(None)}"
    assert {a for a in answers if a is not None} == {winner}
    assert (
        first.idempotency_value("copy:alice", "k2") == second.idempotency_value("copy:alice", "k2") == winner
    )


def test_set_release_and_scopes(tmp_path):
    catalogue = Catalogue(tmp_path / "tether.db")
    assert catalogue.claim_idempotency_key("copy:alice", "k", "pending") is None
    assert catalogue.claim_idempotency_key("copy:bob", "k", "other") is None  # scopes are separate
    catalogue.set_idempotency_value("copy:alice", "k", "tinker://r/weights/a")
    assert catalogue.claim_idempotency_key("copy:alice", "k", "again") == "tinker://r/weights/a"
    assert not catalogue.replace_idempotency_value("copy:alice", "k", "pending", "mine")
    assert catalogue.replace_idempotency_value("copy:alice", "k", "tinker://r/weights/a", "mine")
    catalogue.release_idempotency_key("copy:alice", "k")
    assert catalogue.idempotency_value("copy:alice", "k") is None
    assert catalogue.claim_idempotency_key("copy:alice", "k", "fresh") is None
    catalogue.set_idempotency_value("copy:alice", "unclaimed", "x")  # setting an unclaimed key stores nothing
    assert catalogue.idempotency_value("copy:alice", "unclaimed") is None
    catalogue.release_idempotency_key("copy:alice", "never-claimed")  # releasing twice is fine


def _populate(catalogue: Catalogue, runs: int, checkpoints_per_run: int) -> None:
    catalogue.create_session("s1", "alice", tags=[], user_metadata={}, display_name=None, project_id=None)
    for r in range(runs):
        run_id = f"s1:train:{r}"
        catalogue.add_training_run(
            run_id, "s1", "alice", base_model="m", is_lora=True, lora_rank=4, lora_config={}, user_metadata={}
        )
        for c in range(checkpoints_per_run):
            kind, segment = ("training", "weights") if c % 2 == 0 else ("sampler", "sampler_weights")
            catalogue.add_checkpoint(
                run_id,
                f"{segment}/c{c}",
                "alice",
                checkpoint_type=kind,
                directory="/x",
                size_bytes=1,
                ttl_seconds=None,
                user_metadata={},
            )


def test_reads_do_not_wait_for_the_write_lock(tmp_path):
    catalogue = Catalogue(tmp_path / "tether.db")
    _populate(catalogue, runs=2, checkpoints_per_run=2)
    with catalogue._write_lock, ThreadPoolExecutor(1) as pool:  # a writer of this catalogue is busy
        reads = [
            pool.submit(catalogue.list_training_runs, "alice", 10, 0),
            pool.submit(catalogue.list_checkpoints, "alice"),
            pool.submit(catalogue.get_session, "s1", "alice"),
            pool.submit(catalogue.latest_checkpoints, "alice", ["s1:train:0"]),
        ]
        # a timeout only so that a regression fails instead of hanging the suite
        assert [r.result(timeout=60) is not None for r in reads] == [True] * 4


def test_reads_see_a_snapshot_while_another_connection_writes(tmp_path):
    import sqlite3

    catalogue = Catalogue(tmp_path / "tether.db")
    _populate(catalogue, runs=1, checkpoints_per_run=1)
    other = sqlite3.connect(tmp_path / "tether.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE training_runs SET base_model = 'changed'")
    try:
        runs, total = catalogue.list_training_runs("alice", 10, 0)  # WAL: no wait, the committed state
        assert total == 1 and runs[0].base_model == "m"
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_totals_and_latest_checkpoints_come_from_sql(tmp_path):
    catalogue = Catalogue(tmp_path / "tether.db")
    _populate(catalogue, runs=3, checkpoints_per_run=4)
    statements: list[str] = []
    event.listen(
        catalogue._engine,
        "before_cursor_execute",
        lambda _conn, _cur, sql, *_: statements.append(sql.lower()),
    )
    rows, total = catalogue.list_checkpoints("alice", limit=2, offset=1)
    assert total == 12 and len(rows) == 2
    assert any("count(*)" in s for s in statements)
    runs, total = catalogue.list_training_runs("alice", limit=2, offset=0)
    assert total == 3 and [r.run_id for r in runs] == ["s1:train:2", "s1:train:1"]
    statements.clear()
    latest = catalogue.latest_checkpoints("alice", [r.run_id for r in runs])
    assert len([s for s in statements if s.lstrip().startswith("select")]) == 1
    assert {k: v.checkpoint_id for k, v in latest.items()} == {
        ("s1:train:2", "training"): "weights/c2",
        ("s1:train:2", "sampler"): "sampler_weights/c3",
        ("s1:train:1", "training"): "weights/c2",
        ("s1:train:1", "sampler"): "sampler_weights/c3",
    }
    assert catalogue.latest_checkpoints("bob", ["s1:train:2"]) == {}
