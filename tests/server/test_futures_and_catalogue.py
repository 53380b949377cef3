"""The futures store and the SQLite catalogue, without HTTP or models."""

from __future__ import annotations

import asyncio
import concurrent.futures
from datetime import timedelta

import pytest

from tether.server.catalogue import Catalogue, utcnow
from tether.server.futures import FutureStore
from tether.types.errors import NotFoundError, UserInputError


def test_wait_returns_payload_failure_or_nothing_after_timeout():
    store = FutureStore()
    pending: concurrent.futures.Future = concurrent.futures.Future()
    store.add("r1", "alice", pending)

    async def scenario():
        assert (await store.wait("r1", "alice", 0.05)).payload is None
        waiter = asyncio.ensure_future(store.wait("r1", "alice", 5))
        await asyncio.sleep(0.02)
        pending.set_result(b"proto")
        return await waiter

    assert asyncio.run(scenario()).payload == b"proto"
    failed: concurrent.futures.Future = concurrent.futures.Future()
    failed.set_exception(UserInputError("bad token", field="model_input", datum_index=2))
    store.add("r2", "alice", failed)
    outcome = asyncio.run(store.wait("r2", "alice", 1))
    assert outcome.failed and outcome.payload["category"] == "user" and "datum 2" in outcome.payload["error"]


def test_other_owner_and_unknown_ids_are_not_found():
    store = FutureStore()
    done: concurrent.futures.Future = concurrent.futures.Future()
    done.set_result({"ok": True})
    store.add("r1", "alice", done)
    with pytest.raises(NotFoundError):
        asyncio.run(store.wait("r1", "bob", 1))
    with pytest.raises(NotFoundError):
        asyncio.run(store.wait("nope", "alice", 1))
    assert asyncio.run(store.wait("r1", "alice", 1)).payload == {"ok": True}
    assert asyncio.run(store.wait("r1", "alice", 1)).payload == {"ok": True}  # re-fetch after a lost answer


def test_sweep_drops_delivered_results_after_the_refetch_window():
    import time

    from tether.server.futures import REFETCH_WINDOW_S

    store = FutureStore()
    for rid in ("delivered", "waiting"):
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result({"id": rid})
        store.add(rid, "alice", done)
    asyncio.run(store.wait("delivered", "alice", 1))
    assert store.sweep(time.monotonic() + 1) == 0
    assert store.sweep(time.monotonic() + REFETCH_WINDOW_S + 1) == 1
    assert not store.has("delivered") and store.has("waiting")


def test_catalogue_survives_reopening_and_isolates_owners(tmp_path):
    db = tmp_path / "tether.db"
    catalogue = Catalogue(db)
    catalogue.create_session("s1", "alice", tags=[], user_metadata={}, display_name=None, project_id=None)
    catalogue.add_training_run(
        "s1:train:0",
        "s1",
        "alice",
        base_model="m",
        is_lora=True,
        lora_rank=4,
        lora_config={"rank": 4},
        user_metadata={},
    )
    catalogue.add_checkpoint(
        "s1:train:0",
        "weights/a",
        "alice",
        checkpoint_type="training",
        directory="/x",
        size_bytes=10,
        ttl_seconds=3600,
        user_metadata={},
    )
    catalogue.close()

    reopened = Catalogue(db)
    rows, total = reopened.list_checkpoints("alice")
    assert total == 1 and rows[0].tinker_path == "tinker://s1:train:0/weights/a"
    assert reopened.list_checkpoints("bob") == ([], 0)
    with pytest.raises(NotFoundError):
        reopened.get_training_run("s1:train:0", "bob")
    assert reopened.expired_checkpoints(now=utcnow() + timedelta(minutes=59)) == []
    assert len(reopened.expired_checkpoints(now=utcnow() + timedelta(minutes=61))) == 1
    assert reopened.stale_sessions(60, now=utcnow() + timedelta(seconds=61)) == ["s1"]
    reopened.expire_active_sessions()
    assert not reopened.heartbeat("s1", "alice")


def test_cancelled_operation_reads_as_a_failed_future():
    store = FutureStore()
    pending: concurrent.futures.Future = concurrent.futures.Future()
    store.add("r1", "alice", pending)

    async def scenario():
        waiter = asyncio.ensure_future(store.wait("r1", "alice", 5))
        await asyncio.sleep(0.02)
        assert store.cancel("r1", "alice")
        return await waiter

    outcome = asyncio.run(scenario())
    assert outcome.failed and "cancelled" in outcome.payload["error"]
    assert asyncio.run(store.wait("r1", "alice", 1)).failed


def _run_catalogue(tmp_path) -> Catalogue:
    catalogue = Catalogue(tmp_path / "tether.db")
    catalogue.create_session("s1", "alice", tags=[], user_metadata={}, display_name=None, project_id=None)
    catalogue.add_training_run(
        "s1:train:0",
        "s1",
        "alice",
        base_model="m",
        is_lora=True,
        lora_rank=4,
        lora_config={"rank": 4},
        user_metadata={},
    )
    return catalogue


def test_touching_a_run_writes_once_per_interval_and_reads_see_the_newest_time(tmp_path):
    from sqlalchemy import event

    catalogue = _run_catalogue(tmp_path)
    updates: list[str] = []
    event.listen(
        catalogue._engine,
        "before_cursor_execute",
        lambda _c, _cur, statement, *_: updates.append(statement) if statement.startswith("UPDATE") else None,
    )
    created = catalogue.get_training_run("s1:train:0", "alice").last_request_time
    for _ in range(50):  # a training step each: one write, not fifty
        catalogue.touch_training_run("s1:train:0")
    assert len(updates) == 1
    touched = catalogue.get_training_run(
        "s1:train:0", "alice"
    ).last_request_time  # the read writes the newest
    assert len(updates) == 2 and touched > created
    catalogue.touch_training_run("s1:train:0")
    catalogue.close()  # what waits in memory is written on close
    assert len(updates) == 3
    reopened = Catalogue(tmp_path / "tether.db")
    assert reopened.get_training_run("s1:train:0", "alice").last_request_time > touched
    reopened.close()


def test_after_runs_once_the_payload_is_published_and_its_failure_leaves_the_payload(tmp_path):
    from types import SimpleNamespace

    from tether.server.operations import chain

    seen: list[tuple[object, bool]] = []
    results = concurrent.futures.ThreadPoolExecutor(1)
    state = SimpleNamespace(results=results)
    source: concurrent.futures.Future = concurrent.futures.Future()
    holder: list[concurrent.futures.Future] = []

    def after(result: object) -> None:
        seen.append((result, holder[0].done()))
        raise RuntimeError("bookkeeping broke")

    payload = chain(state, source, lambda r: {"value": r}, after=after)  # type: ignore[arg-type]
    holder.append(payload)
    source.set_result(7)
    assert payload.result(timeout=10) == {"value": 7}
    results.shutdown(wait=True)
    assert seen == [(7, True)]
