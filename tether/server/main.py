"""Build and run the `tether serve` application.

`create_app(config)` assembles the FastAPI app (routes, auth, error mapping, state, background
reaper); `serve(config)` runs it with uvicorn until interrupted; `ServerThread(config)` runs it in a
background thread on a free port for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import uvicorn
from fastapi import FastAPI

from tether.server.auth import ApiKeyAuth
from tether.server.catalogue import Catalogue
from tether.server.checkpoints import CheckpointFiles
from tether.server.config import ServerConfig
from tether.server.errors import install_error_handlers
from tether.server.futures import FutureStore
from tether.server.guard import RequestGuard
from tether.server.reconcile import reconcile_storage
from tether.server.responses import FiniteJSONResponse
from tether.server.run_metrics import RunMetrics
from tether.server.sessions import reaper_loop
from tether.server.stability import StabilityRecords
from tether.server.state import ServerState
from tether.server.trainers import TrainerPool

log = logging.getLogger("tether.server")

DATABASE_FILE = "tether.db"


def build_state(config: ServerConfig) -> ServerState:
    data_dir = Path(config.data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    catalogue = Catalogue(data_dir / DATABASE_FILE)
    catalogue.expire_active_sessions()
    return ServerState(
        config=config,
        auth=ApiKeyAuth(config.api_keys),
        catalogue=catalogue,
        checkpoints=CheckpointFiles(data_dir),
        futures=FutureStore(),
        trainers=TrainerPool(config),
        run_metrics=RunMetrics(catalogue, max_points_per_series=config.metrics_points_per_series),
        stability=StabilityRecords(max_tokens=config.stability_record_max_tokens),
    )


def create_app(config: ServerConfig) -> FastAPI:
    """The FastAPI app serving the Tinker protocol and tether's extensions for `config`."""
    from tether.server import (
        routes_rest,
        routes_sampling,
        routes_service,
        routes_tether,
        routes_tokenizer,
        routes_training,
    )

    state = build_state(config)
    data_dir_lock = reconcile_storage(Path(config.data_dir).expanduser(), state.catalogue)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        reaper = asyncio.create_task(reaper_loop(state, config.maintenance_interval_s))
        # Warm start: load the base models (and torch) now, not on the first client's request.
        threading.Thread(target=state.trainers.warm_up, name="tether-warm-up", daemon=True).start()
        try:
            yield
        finally:
            reaper.cancel()
            from tether.server import routes_deployments  # deployments hook (deployments branch)

            await asyncio.to_thread(routes_deployments.close, app)
            await asyncio.to_thread(state.close)
            data_dir_lock.release()

    app = FastAPI(title="tether", lifespan=lifespan, default_response_class=FiniteJSONResponse)
    app.state.tether = state
    app.add_middleware(RequestGuard, state=state)
    install_error_handlers(app)
    for module in (
        routes_service,
        routes_training,
        routes_sampling,
        routes_rest,
        routes_tether,
        routes_tokenizer,
    ):
        app.include_router(module.router)
    from tether.server import routes_console, routes_jobs

    routes_console.install(app)  # console pages, run metrics JSON, Prometheus /metrics
    from tether.server import routes_deployments

    routes_deployments.install(app)  # deployments: control plane + hot-load/inference proxy
    routes_jobs.install(app)  # trainer jobs: the control plane and its proxy to each job
    return app


def _uvicorn_server(config: ServerConfig) -> uvicorn.Server:
    app = create_app(config)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level if config.log_level != "info" else "warning",
        timeout_keep_alive=75,
        access_log=config.log_level == "debug",
    )
    return uvicorn.Server(uv_config)


def _bound_url(server: uvicorn.Server, host: str) -> str:
    sockets = [s for srv in server.servers for s in srv.sockets]
    port = sockets[0].getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{port}"


def _write_ready_file(path: Path, url: str) -> None:
    """Atomically, so a reader polling for the file never sees half a URL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(url)
    os.replace(tmp, path)


def configure_logging(level: str) -> None:
    """The server's log format at `level`. Below debug, httpx's line per request the server itself
    sends (a deployment's /status polls, hot-loads and proxied completions) is left out, as
    uvicorn's access log is: with a deployment they were nearly every line of the log."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


def serve(config: ServerConfig) -> None:
    """Run the server in the foreground until interrupted.

    Start-up, until the base models are loaded, runs without the cyclic garbage collector: importing
    torch and transformers and loading a model allocate long-lived objects only, and collecting them
    over and over took about a fifth of start-up's CPU time (1.1 of 5 CPU seconds to import the server
    and trainer and load a small Qwen3). Once the models are loaded, what start-up built is frozen
    (never scanned again) and collection resumes."""
    configure_logging(config.log_level)
    gc.disable()
    try:
        server = _uvicorn_server(config)
        # uvicorn's own loop (uvloop when installed), as `uvicorn.Server.run` would pick; plain
        # `asyncio.run` would give the stdlib loop (overhead hook: issue 16).
        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            runner.run(_serve(server, config))
    finally:
        _start_up_done()


def _start_up_done() -> None:
    """Freeze start-up's objects and resume collection. Start-up's few cyclic leftovers are frozen with
    them rather than paying a full collection before ready (0.4 s CPU; for a Qwen3 model: 13k small
    objects, no tensor)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


async def _serve(server: uvicorn.Server, config: ServerConfig) -> None:
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        url = _bound_url(server, config.host)
        print(f"tether serve: listening on {url}; loading {', '.join(config.models)}", flush=True)
        state: ServerState = server.config.app.state.tether  # type: ignore[union-attr]
        warm = asyncio.ensure_future(state.trainers.until_warm())  # ready = a model can serve
        await asyncio.wait([warm, task], return_when=asyncio.FIRST_COMPLETED)
        if warm.done():
            _start_up_done()
            print(f"tether serve: ready ({state.trainers.readiness()})", flush=True)
            if config.ready_file is not None:
                _write_ready_file(config.ready_file, url)
        else:
            warm.cancel()
    _start_up_done()
    await task


class ServerThread:
    """Run a server in a background thread (tests, benchmarks): `with ServerThread(cfg) as base_url:`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url: str | None = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def app(self) -> FastAPI:
        assert self._server is not None
        return cast(FastAPI, self._server.config.app)  # the app `_uvicorn_server` built

    def start(self) -> str:
        self._server = _uvicorn_server(self.config)
        self._thread = threading.Thread(target=self._server.run, name="tether-server", daemon=True)
        self._thread.start()
        deadline = 30.0
        step = 0.01
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("tether server failed to start")
            deadline -= step
            if deadline <= 0:
                raise TimeoutError("tether server did not start within 30 s")
            threading.Event().wait(step)
        self.base_url = _bound_url(self._server, self.config.host)
        return self.base_url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
