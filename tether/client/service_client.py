"""`ServiceClient`: the entry point of the SDK; creates training, sampling and REST clients.

`ServiceClient(base_url=..., api_key=...)` talks to a running server; `base_url="local"` starts an
embedded one for the life of the client. Nothing is sent until the first call that needs the
server, and the server-side session is created then.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import httpx

from tether.client import routes
from tether.client.api_future import APIFuture, ClientFuture, completed_future
from tether.client.local_server import LocalServer
from tether.client.rest_client import RestClient
from tether.client.sampling_client import SamplingClient, create_sampling_client
from tether.client.session import ClientSession
from tether.client.training_client import TrainingClient
from tether.client.transport import Transport
from tether.types.data import GetServerCapabilitiesResponse, LoraConfig
from tether.types.errors import UserInputError
from tether.types.wire import CreateModelRequest, GetInfoRequest, LoadWeightsRequest, make_wire

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
LOCAL_API_KEY = "tml-local"


def _is_loopback(base_url: str) -> bool:
    host = httpx.URL(base_url).host
    return host in ("localhost", "::1") or host.startswith("127.")


class ServiceClient:
    """Connects to a tether (or any Tinker-compatible) server and makes the other clients."""

    def __init__(
        self,
        user_metadata: dict[str, Any] | None = None,
        project_id: str | None = None,
        *,
        display_name: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        local_data_dir: str | Path | None = None,
        http_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`base_url` defaults to $TETHER_BASE_URL, then $TINKER_BASE_URL, then localhost:8000;
        `api_key` to $TETHER_API_KEY, then $TINKER_API_KEY, then (for a server on this machine only)
        the local key `tml-local`. `"local"` starts an embedded server
        (data in `local_data_dir`, a temporary directory by default)."""
        base_url = (
            base_url
            or os.environ.get("TETHER_BASE_URL")
            or os.environ.get("TINKER_BASE_URL")
            or DEFAULT_BASE_URL
        )
        self._local: LocalServer | None = None
        if base_url == "local":
            self._local = LocalServer(data_dir=local_data_dir)
            base_url = self._local.base_url
            api_key = api_key or LOCAL_API_KEY
        api_key = api_key or os.environ.get("TETHER_API_KEY") or os.environ.get("TINKER_API_KEY")
        if not api_key and _is_loopback(base_url):
            api_key = LOCAL_API_KEY  # a server on this machine without configured keys takes any tml- key
        if not api_key:
            raise UserInputError("no API key: pass api_key= or set TETHER_API_KEY", field="api_key")
        self.base_url = base_url
        transport = Transport(base_url, api_key, http_transport=http_transport)
        self._session = ClientSession(
            transport, user_metadata=user_metadata, project_id=project_id, display_name=display_name
        )

    # ---- training clients

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
    ) -> ClientFuture[TrainingClient]:
        """A new trainable model with LoRA adapters of `rank` (0: full fine-tuning, a tether extension)."""
        if not isinstance(rank, int) or rank < 0:
            raise UserInputError(f"must be an int >= 0, got {rank!r}", field="rank")
        if not (train_mlp or train_attn or train_unembed):
            raise UserInputError(
                "at least one of train_mlp, train_attn, train_unembed must be true", field="train_mlp"
            )
        lora = LoraConfig(
            rank=rank, seed=seed, train_unembed=train_unembed, train_mlp=train_mlp, train_attn=train_attn
        )
        session = self._session

        async def run() -> TrainingClient:
            body = make_wire(
                CreateModelRequest,
                session_id=await session.session_id(),
                model_seq_id=session.next_model_seq_id(),
                base_model=base_model,
                user_metadata=user_metadata,
                lora_config=lora,
            )
            created = await session.transport.call(routes.CREATE_MODEL, body)
            return await _training_client_for(session, created.model_id)

        return ClientFuture(session.spawn(run()), "create_lora_training_client")

    def create_training_client_from_state(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> ClientFuture[TrainingClient]:
        """A new trainable model with the weights (not the optimizer state) of checkpoint `path`."""
        return self._from_state(path, base_model, user_metadata, weights_access_token, optimizer=False)

    def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> ClientFuture[TrainingClient]:
        """A new trainable model resuming checkpoint `path`: weights and optimizer state."""
        return self._from_state(path, base_model, user_metadata, weights_access_token, optimizer=True)

    def _from_state(
        self,
        path: str,
        base_model: str | None,
        user_metadata: dict[str, str] | None,
        weights_access_token: str | None,
        *,
        optimizer: bool,
    ) -> ClientFuture[TrainingClient]:
        if not isinstance(path, str) or not path.startswith("tinker://"):
            raise UserInputError(f"must be a tinker:// checkpoint path, got {path!r}", field="path")
        session = self._session

        async def run() -> TrainingClient:
            session_id = await session.session_id()
            model_seq_id = session.next_model_seq_id()
            body = make_wire(
                LoadWeightsRequest,
                session_id=session_id,
                model_seq_id=model_seq_id,
                base_model=base_model,
                user_metadata=user_metadata,
                path=path,
                optimizer=optimizer,
                weights_access_token=weights_access_token,
            )
            loaded = await session.transport.call(routes.LOAD_WEIGHTS, body)
            # The model id a create-via-load derives, for a server that does not echo it.
            return await _training_client_for(
                session, loaded.model_id or f"{session_id}:train:{model_seq_id}"
            )

        return ClientFuture(session.spawn(run()), "create_training_client_from_state")

    # ---- sampling and the rest

    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
    ) -> ClientFuture[SamplingClient]:
        """Sample from a sampler checkpoint (`tinker://.../sampler_weights/...`) or a base model
        (`record_stability_info`: its samples can be trained on with stable_reinforce)."""
        coro = create_sampling_client(
            self._session,
            model_path=model_path,
            base_model=base_model,
            record_stability_info=record_stability_info,
        )
        return ClientFuture(self._session.spawn(coro), "create_sampling_client")

    def get_server_capabilities(self) -> GetServerCapabilitiesResponse:
        return self.create_rest_client().get_server_capabilities().result()

    def create_rest_client(self) -> RestClient:
        return RestClient(self._session)

    # ---- lifetime

    def close(
        self, status: Literal["success", "errored", "interrupted"] = "success", detail: str | None = None
    ) -> APIFuture[None]:
        """Finish the server session (with `status`) and stop the embedded server, if any.

        Returns an already completed future, like the Tinker SDK's (which is also awaited there).
        """
        self._session.close(status, detail)
        if self._local is not None:
            self._local.stop()
            self._local = None
        return completed_future(None, "close")

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self.close("success" if exc_type is None else "errored")


async def _training_client_for(session: ClientSession, model_id: str) -> TrainingClient:
    info = await session.transport.call(routes.GET_INFO, GetInfoRequest(model_id=model_id))
    return TrainingClient(session, model_id, info)
