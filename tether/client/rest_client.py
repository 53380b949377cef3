"""`RestClient`: the catalogue of runs, checkpoints, sessions and samplers (no session needed).

Thin typed wrappers over the REST routes of tinker-protocol.md §3.5. Checkpoint ids are
`"<kind>/<name>"` (e.g. `weights/step-10`) and go into URLs unescaped, as the protocol requires.
"""

from __future__ import annotations

from typing import Any

from tether.client.api_future import APIFuture
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

    def _get(self, path: str, params: dict[str, Any] | None, parse: Any, name: str) -> APIFuture[Any]:
        async def run() -> Any:
            return parse(await self._session.transport.get_json(path, params))

        return self._session.run(run(), name)

    def _send(self, method: str, path: str, body: Any, name: str) -> APIFuture[None]:
        async def run() -> None:
            await self._session.transport.request(method, path, json=body)

        return self._session.run(run(), name)

    def get_server_capabilities(self) -> APIFuture[GetServerCapabilitiesResponse]:
        return self._get(
            "/api/v1/get_server_capabilities", None, GetServerCapabilitiesResponse.model_validate, "capabilities"
        )

    def get_training_run(self, training_run_id: str, access_scope: str = "owned") -> APIFuture[TrainingRun]:
        return self._get(
            f"/api/v1/training_runs/{training_run_id}",
            {"access_scope": access_scope},
            TrainingRun.model_validate,
            "get_training_run",
        )

    def get_training_run_by_tinker_path(self, tinker_path: str) -> APIFuture[TrainingRun]:
        run_id, _ = parse_tinker_path(tinker_path)
        return self.get_training_run(run_id)

    def list_training_runs(
        self, limit: int = 20, offset: int = 0, access_scope: str = "owned"
    ) -> APIFuture[TrainingRunsResponse]:
        params = {"limit": limit, "offset": offset, "access_scope": access_scope}
        return self._get("/api/v1/training_runs", params, TrainingRunsResponse.model_validate, "list_training_runs")

    def list_checkpoints(self, training_run_id: str) -> APIFuture[CheckpointsListResponse]:
        return self._get(
            f"/api/v1/training_runs/{training_run_id}/checkpoints",
            None,
            CheckpointsListResponse.model_validate,
            "list_checkpoints",
        )

    def list_user_checkpoints(self, limit: int = 100, offset: int = 0) -> APIFuture[CheckpointsListResponse]:
        params = {"limit": limit, "offset": offset}
        return self._get("/api/v1/checkpoints", params, CheckpointsListResponse.model_validate, "list_user_checkpoints")

    def get_weights_info_by_tinker_path(self, tinker_path: str) -> APIFuture[WeightsInfoResponse]:
        parse_tinker_path(tinker_path)

        async def run() -> WeightsInfoResponse:
            body = {"tinker_path": tinker_path}
            return WeightsInfoResponse.model_validate(await self._session.transport.post_json("/api/v1/weights_info", body))

        return self._session.run(run(), "get_weights_info")

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> APIFuture[None]:
        return self._send(
            "DELETE", f"/api/v1/training_runs/{training_run_id}/checkpoints/{checkpoint_id}", None, "delete_checkpoint"
        )

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        return self.delete_checkpoint(*parse_tinker_path(tinker_path))

    def set_checkpoint_ttl_from_tinker_path(self, tinker_path: str, ttl_seconds: int | None) -> APIFuture[None]:
        run_id, checkpoint_id = parse_tinker_path(tinker_path)
        path = f"/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}/ttl"
        return self._send("PUT", path, {"ttl_seconds": ttl_seconds}, "set_checkpoint_ttl")

    def publish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        run_id, checkpoint_id = parse_tinker_path(tinker_path)
        return self._send("POST", f"/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}/publish", None, "publish")

    def unpublish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        run_id, checkpoint_id = parse_tinker_path(tinker_path)
        path = f"/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}/publish"
        return self._send("DELETE", path, None, "unpublish")

    def list_sessions(self, limit: int = 20, offset: int = 0) -> APIFuture[ListSessionsResponse]:
        params = {"limit": limit, "offset": offset}
        return self._get("/api/v1/sessions", params, ListSessionsResponse.model_validate, "list_sessions")

    def get_session(self, session_id: str) -> APIFuture[GetSessionResponse]:
        return self._get(f"/api/v1/sessions/{session_id}", None, GetSessionResponse.model_validate, "get_session")

    def get_sampler(self, sampler_id: str) -> APIFuture[GetSamplerResponse]:
        return self._get(f"/api/v1/samplers/{sampler_id}", None, GetSamplerResponse.model_validate, "get_sampler")
