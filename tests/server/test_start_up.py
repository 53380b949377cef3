"""`tether serve` start-up does only what a first request needs: the CLI loads one command, building the
app imports no model library, alembic or job machinery, the job manager waits for the models, and
the cyclic garbage collector stays off until the models are loaded."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time

import httpx

from tether.cli import build_parser
from tether.server.catalogue import Catalogue
from tether.server.config import ServerConfig
from tether.server.main import DATABASE_FILE, ServerThread
from tether.server.trainers import TrainerPool

NOT_AT_START_UP = (
    "torch",
    "transformers",
    "peft",
    "alembic",
    "tether.recipes",
    "tether.jobs.manager",
    "tether.deployment",
    "tether.engine.model_loading",
    "ray",
    "vllm",
    "playwright",
)
"""Modules `tether serve` must not import before the first request (or the warm-up) needs them."""


def _imported_in_fresh_python(code: str) -> list[str]:
    """Which of `NOT_AT_START_UP` (or their submodules) a fresh interpreter has imported after `code`."""
    probe = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import sys
        heavy = {NOT_AT_START_UP!r}
        print(sorted({{m for m in sys.modules for h in heavy if m == h or m.startswith(h + ".")}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_parsing_serve_loads_no_other_commands_config():
    assert (
        _imported_in_fresh_python(
            """
            from tether.cli import build_parser
            build_parser(["serve", "--port", "0"]).parse_args(["serve", "--port", "0"])
            """
        )
        == []
    )


def test_every_command_still_has_its_options():
    assert build_parser(["sft"]).parse_args(["sft", "--dataset-path", "d.jsonl"]).dataset_path == "d.jsonl"
    assert build_parser(["jobs", "get"]).parse_args(["jobs", "get", "--job-id", "j"]).job_id == "j"
    everything = build_parser()  # no argv: every command's options (documentation, tests)
    assert everything.parse_args(["grpo", "--group-size", "4"]).group_size == 4


def test_building_the_app_imports_nothing_the_first_request_does_not_need(tmp_path):
    Catalogue(tmp_path / DATABASE_FILE).close()  # a restart: the database is already at head
    assert (
        _imported_in_fresh_python(
            f"""
            from tether.server.config import ServerConfig
            from tether.server.main import create_app
            create_app(ServerConfig(port=0, data_dir={str(tmp_path)!r}))
            """
        )
        == []
    )


def test_the_job_manager_is_built_after_the_models_load_or_on_first_use(tmp_path, monkeypatch):
    loading = threading.Event()
    warm_up = TrainerPool.warm_up

    def slow_warm_up(pool: TrainerPool) -> None:
        loading.wait(60)
        warm_up(pool)

    monkeypatch.setattr(TrainerPool, "warm_up", slow_warm_up)
    server = ServerThread(ServerConfig(port=0, data_dir=tmp_path))
    with server as url:
        assert httpx.get(f"{url}/api/v1/healthz").status_code == 503  # still loading
        assert server.app.state.tether_jobs is None
        loading.set()
        deadline = time.monotonic() + 120
        while server.app.state.tether_jobs is None:  # the monitor builds it once the models can serve
            assert time.monotonic() < deadline
            time.sleep(0.05)

    server = ServerThread(ServerConfig(port=0, data_dir=tmp_path / "again"))
    loading.clear()
    monkeypatch.setattr(TrainerPool, "warm_up", slow_warm_up)
    with server as url:  # a job request before the models load builds it on demand
        answer = httpx.get(f"{url}/training/v1/trainerJobs", headers={"X-API-Key": "tml-test"})
        assert answer.status_code == 200 and answer.json()["jobs"] == []
        assert server.app.state.tether_jobs is not None
        loading.set()


def test_serve_collects_garbage_only_once_its_models_are_loaded(tmp_path, default_model_dir):
    """The cyclic collector is off from the CLI's first import until the warm-up has loaded the models,
    and on again (with start-up's objects frozen) before the ready file appears."""
    ready, seen = tmp_path / "ready", tmp_path / "seen.json"
    runner = textwrap.dedent(
        f"""
        import gc, json, os, sys, threading, time
        from pathlib import Path
        collecting_at = {{"start": gc.isenabled()}}
        from tether import cli
        from tether.server.trainers import TrainerPool
        warm_up = TrainerPool.warm_up
        def recording_warm_up(pool):
            collecting_at["warm_up"] = gc.isenabled()
            warm_up(pool)
        TrainerPool.warm_up = recording_warm_up
        def watch():
            while not Path({str(ready)!r}).exists():
                time.sleep(0.02)
            collecting_at["ready"] = gc.isenabled()
            collecting_at["frozen"] = gc.get_freeze_count()
            Path({str(seen)!r} + ".tmp").write_text(json.dumps(collecting_at))
            os.replace({str(seen)!r} + ".tmp", {str(seen)!r})
        threading.Thread(target=watch, daemon=True).start()
        cli.main(["serve", "--port", "0", "--data-dir", {str(tmp_path / "data")!r},
                  "--ready-file", {str(ready)!r}])
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", runner], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 180
        while not seen.exists():
            assert process.poll() is None, process.stderr.read().decode()[-2000:] if process.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        collecting_at = json.loads(seen.read_text())
    finally:
        process.terminate()
        process.wait(30)
    assert collecting_at["start"] is True and collecting_at["warm_up"] is False
    assert collecting_at["ready"] is True and collecting_at["frozen"] > 10_000


def test_until_warm_wakes_its_waiters_once_every_model_was_tried(monkeypatch):
    pool = TrainerPool(ServerConfig(port=0, models=["a"]))

    def cannot_load(name: str) -> None:
        raise RuntimeError(f"{name} cannot load")

    monkeypatch.setattr(pool, "base_info", cannot_load)

    async def scenario() -> None:
        waiter = asyncio.ensure_future(pool.until_warm())
        gone = asyncio.ensure_future(pool.until_warm())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        gone.cancel()  # a waiter that went away does not trouble the warm-up
        await asyncio.to_thread(pool.warm_up)
        await asyncio.wait_for(waiter, 30)
        await asyncio.wait_for(pool.until_warm(), 30)  # already warm: at once

    asyncio.run(scenario())
    assert pool.readiness()["a"] == "failed: RuntimeError: a cannot load"
