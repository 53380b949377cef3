"""The server's shared state, reachable from every route through `request.app.state.tether`."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field

from fastapi import Request

from tether.server.auth import ApiKeyAuth
from tether.server.catalogue import Catalogue
from tether.server.checkpoints import CheckpointFiles
from tether.server.config import ServerConfig
from tether.server.dedupe import DedupeRegistry
from tether.server.futures import FutureStore
from tether.server.live import LiveObjects
from tether.server.run_metrics import RunMetrics
from tether.server.stability import StabilityRecords
from tether.server.trainers import TrainerPool


@dataclass
class ServerState:
    config: ServerConfig
    auth: ApiKeyAuth
    catalogue: Catalogue
    checkpoints: CheckpointFiles
    futures: FutureStore
    trainers: TrainerPool
    run_metrics: RunMetrics
    """Per-run metric series (console curves): what the server observes and what clients log."""
    live: LiveObjects = field(default_factory=LiveObjects)
    dedupe: DedupeRegistry = field(default_factory=DedupeRegistry)
    """Repeats of `(model_id | sampling_session_id | creation stream, seq_id)`."""
    stability: StabilityRecords = field(default_factory=StabilityRecords)
    """Sequences sampled with `record_stability_info=true`, for stable_reinforce."""
    results: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tether-results")
    )
    """Turns op results into payloads and catalogue rows, off the trainer's thread and the event loop."""

    def close(self) -> None:
        self.trainers.close()
        self.results.shutdown(wait=True)
        self.run_metrics.close()
        self.catalogue.close()


def state_of(request: Request) -> ServerState:
    """The state of the app serving `request`."""
    return request.app.state.tether


async def server_state(request: Request) -> ServerState:
    """FastAPI dependency: the state of the app serving this request.

    `async` because it never blocks: FastAPI runs a plain `def` dependency on its thread pool, a
    thread hop per dependency per request (`bench/service_overhead.py` measured it)."""
    return state_of(request)


async def request_owner(request: Request) -> str:
    """FastAPI dependency: the owner named by the request's API key (401 otherwise); never blocks."""
    return state_of(request).auth(request)
