"""What keeps a training step's HTTP path cheap (bench/service_overhead.py measures the effect)."""

from __future__ import annotations

import inspect

from tether.server import state
from tether.server.config import ServerConfig
from tether.server.main import _uvicorn_server


def test_per_request_dependencies_never_hop_to_the_thread_pool():
    # FastAPI runs a plain `def` dependency on its thread pool: two thread hops per request.
    assert inspect.iscoroutinefunction(state.server_state)
    assert inspect.iscoroutinefunction(state.request_owner)


def test_the_server_parses_http_with_httptools_on_uvloop(tmp_path):
    server = _uvicorn_server(ServerConfig(port=0, data_dir=tmp_path, models=["tether/tiny-qwen3"]))
    server.config.load()
    assert server.config.http_protocol_class.__name__ == "HttpToolsProtocol"
    assert server.config.get_loop_factory().__module__.startswith("uvloop")


def test_tether_serve_runs_on_uvicorns_loop(tmp_path, monkeypatch):
    """`serve` (the `tether serve` command) runs its event loop from uvicorn's loop factory (uvloop),
    not `asyncio.run`'s stdlib loop."""
    import asyncio

    import uvicorn

    from tether.server.main import serve

    seen = {}

    async def fake_serve(self, sockets=None):  # returns at once: serve() then ends
        seen["loop"] = type(asyncio.get_running_loop()).__module__

    monkeypatch.setattr(uvicorn.Server, "serve", fake_serve)
    serve(ServerConfig(port=0, data_dir=tmp_path, models=["tether/tiny-qwen3"]))
    assert seen["loop"].startswith("uvloop")
