"""`RestClient`: the catalogue of runs, checkpoints, sessions and samplers (no session needed).

Thin typed wrappers over the REST routes of tinker-protocol.md §3.5. Checkpoint ids are
`"<kind>/<name>"` (e.g. `weights/step-10`) and go into URLs unescaped, as the protocol requires.
"""

from __future__ import annotations

from typing import Any, TypeVar

from tether.client import routes
from tether.client.api_future import APIFuture
from tether.client.routes import Route
from tether.client.session import ClientSession
from tether.types.data import (
    CheckpointsListResponse,
    GetSamplerResponse,
    GetServerCapabilitiesResponse,
    GetSessionResponse,
    ListSessionsResponse,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoResponse,
)
from tether.types.errors import UserInputError
from tether.types.paths import KIND_BY_SEGMENT, SCHEME
from tether.types.wire import SetCheckpointTtlRequest, WeightsInfoRequest, WireModel, make_wire

T = TypeVar("T")


def parse_tinker_path(path: str) -> tuple[str, str]:
    """`tinker://<run_id>/<kind>/<name>` -> (run_id, "<kind>/<name>").

    Checks only the shape, not `tether.types.paths`' strict name rules: another Tinker-compatible
    server may name its runs and checkpoints differently, and it validates them itself.
    """
    if not isinstance(path, str) or not path.startswith(SCHEME):
        raise UserInputError(f"must start with {SCHEME}, got {path!r}", field="tinker_path")
    parts = path[len(SCHEME) :].split("/")
    if len(parts) != 3 or parts[1] not in KIND_BY_SEGMENT or not all(parts):
        raise UserInputError(f"must be tinker://<run_id>/<kind>/<name>, got {path!r}", field="tinker_path")
    return parts[0], f"{parts[1]}/{parts[2]}"


class RestClient:
    """Lists and manages the caller's training runs, checkpoints, sessions and samplers."""

    def __init__(self, session: ClientSession) -> None:
        self._session = session

    def _call(
        self, route: Route[T], name: str, body: WireModel | None = None, params: dict[str, Any] | None = None
    ) -> APIFuture[T]:
        return self._session.run(self._session.transport.call(route, body, params=params), name)

    def get_server_capabilities(self) -> APIFuture[GetServerCapabilitiesResponse]:
        return self._call(routes.GET_SERVER_CAPABILITIES, "capabilities")

    def get_training_run(self, training_run_id: str, access_scope: str = "owned") -> APIFuture[TrainingRun]:
        route = routes.GET_TRAINING_RUN.at(training_run_id=training_run_id)
        return self._call(route, "get_training_run", params={"access_scope": access_scope})

    def get_training_run_by_tinker_path(self, tinker_path: str) -> APIFuture[TrainingRun]:
        run_id, _ = parse_tinker_path(tinker_path)
        return self.get_training_run(run_id)

    def list_training_runs(
        self, limit: int = 20, offset: int = 0, access_scope: str = "owned"
    ) -> APIFuture[TrainingRunsResponse]:
        params = {"limit": limit, "offset": offset, "access_scope": access_scope}
        return self._call(routes.LIST_TRAINING_RUNS, "list_training_runs", params=params)

    def list_checkpoints(self, training_run_id: str) -> APIFuture[CheckpointsListResponse]:
        return self._call(routes.LIST_CHECKPOINTS.at(training_run_id=training_run_id), "list_checkpoints")

    def list_user_checkpoints(self, limit: int = 100, offset: int = 0) -> APIFuture[CheckpointsListResponse]:
        params = {"limit": limit, "offset": offset}
        return self._call(routes.LIST_USER_CHECKPOINTS, "list_user_checkpoints", params=params)

    def get_weights_info_by_tinker_path(self, tinker_path: str) -> APIFuture[WeightsInfoResponse]:
        parse_tinker_path(tinker_path)
        return self._call(
            routes.WEIGHTS_INFO, "get_weights_info", WeightsInfoRequest(tinker_path=tinker_path)
        )

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> APIFuture[None]:
        route = routes.DELETE_CHECKPOINT.at(training_run_id=training_run_id, checkpoint_id=checkpoint_id)
        return self._call(route, "delete_checkpoint")

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        return self.delete_checkpoint(*parse_tinker_path(tinker_path))

    def set_checkpoint_ttl_from_tinker_path(
        self, tinker_path: str, ttl_seconds: int | None
    ) -> APIFuture[None]:
        """Expire the checkpoint `ttl_seconds` from now (None: never); at least an hour, else UserInputError."""
        run_id, checkpoint_id = parse_tinker_path(tinker_path)
        body = make_wire(SetCheckpointTtlRequest, ttl_seconds=ttl_seconds)
        route = routes.SET_CHECKPOINT_TTL.at(training_run_id=run_id, checkpoint_id=checkpoint_id)
        return self._call(route, "set_checkpoint_ttl", body)

    def publish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        run_id, checkpoint_id = parse_tinker_path(tinker_path)
        return self._call(
            routes.PUBLISH_CHECKPOINT.at(training_run_id=run_id, checkpoint_id=checkpoint_id), "publish"
        )

    def unpublish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        run_id, checkpoint_id = parse_tinker_path(tinker_path)
        route = routes.UNPUBLISH_CHECKPOINT.at(training_run_id=run_id, checkpoint_id=checkpoint_id)
        return self._call(route, "unpublish")

    def list_sessions(self, limit: int = 20, offset: int = 0) -> APIFuture[ListSessionsResponse]:
        return self._call(routes.LIST_SESSIONS, "list_sessions", params={"limit": limit, "offset": offset})

    def get_session(self, session_id: str) -> APIFuture[GetSessionResponse]:
        return self._call(routes.GET_SESSION.at(session_id=session_id), "get_session")

    def get_sampler(self, sampler_id: str) -> APIFuture[GetSamplerResponse]:
        return self._call(routes.GET_SAMPLER.at(sampler_id=sampler_id), "get_sampler")
