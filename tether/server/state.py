"""The server's shared state, reachable from every route through `request.app.state.tether`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from tether.server.auth import ApiKeyAuth
from tether.server.catalogue import Catalogue
from tether.server.checkpoints import CheckpointFiles
from tether.server.config import ServerConfig
from tether.server.futures import FutureStore
from tether.server.model_hosts import ModelHosts
from tether.server.run_metrics import RunMetrics


@dataclass
class ServerState:
    config: ServerConfig
    auth: ApiKeyAuth
    catalogue: Catalogue
    checkpoints: CheckpointFiles
    futures: FutureStore
    hosts: ModelHosts
    run_metrics: RunMetrics
    """Per-run metric series (console curves): what the server observes and what clients log."""
    kept_graphs: dict[str, Any] = field(default_factory=dict)
    """Forward graphs kept for the one-pass custom loss, by the request id of their forward."""

    def close(self) -> None:
        self.hosts.close()
        self.run_metrics.close()
        self.catalogue.close()


def server_state(request: Request) -> ServerState:
    """FastAPI dependency: the state of the app serving this request."""
    return request.app.state.tether


def request_owner(request: Request) -> str:
    """FastAPI dependency: the owner named by the request's API key (401 otherwise)."""
    return server_state(request).auth(request)
