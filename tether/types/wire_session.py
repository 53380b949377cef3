"""JSON bodies of the Tinker protocol's service, session and futures endpoints (tinker-protocol.md
§3.1, §3.4, §4). Re-exported by `tether.types.wire`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from tether.types.wire_base import Int64, NonNegativeInt, Tags, UserMetadata, WireModel

# ------------------------------------------------------------------ service / session (§3.1)


class ClientConfigRequest(WireModel):
    sdk_version: str | None = None


class ClientConfigResponse(WireModel):
    """Feature flags the SDK reads once per client; the defaults equal the SDK's own."""

    pjwt_auth_enabled: bool = False
    credential_default_source: str = "api_key"
    sample_dispatch_bytes_semaphore_size: int = 10 * 1024 * 1024
    inflight_response_bytes_semaphore_size: int = 50 * 1024 * 1024
    parallel_fwdbwd_chunks: bool = True
    proto_compress_fwdbwd: bool = False
    """Ask the SDK to zstd-compress forward_backward bodies (Content-Encoding: zstd)."""
    fwdbwd_max_chunk_len: int = 1024
    fwdbwd_max_chunk_bytes_count: int = 5_000_000
    fwdbwd_dispatch_bytes_semaphore_size: int = 50_000_000
    billing_exception_max_pause_duration_sec: int = 3600
    sample_no_retries: bool = False
    sample_enable_stuck_detection: bool = True
    sample_max_concurrent_requests: int = 2000
    use_pyqwest_transport: bool = True
    sample_use_retrieve_futures: bool = False
    custom_loss_server_side: bool = False
    sample_join_sampling_session: bool = False


class ClientDynamicConfigResponse(WireModel):
    refresh_interval_sec: int = 300
    sample_cancel_enabled: bool = False
    sample_cancel_max_batch_size: int = 64


class HealthResponse(WireModel):
    status: Literal["ok"] = "ok"


class CreateSessionRequest(WireModel):
    tags: Tags
    user_metadata: UserMetadata | None = None
    sdk_version: str
    project_id: str | None = None
    display_name: str | None = None
    type: Literal["create_session"] = "create_session"


class CreateSessionResponse(WireModel):
    session_id: str
    type: Literal["create_session"] = "create_session"
    info_message: str | None = None
    warning_message: str | None = None
    error_message: str | None = None


class SessionHeartbeatRequest(WireModel):
    session_id: str
    type: Literal["session_heartbeat"] = "session_heartbeat"


class SessionHeartbeatResponse(WireModel):
    type: Literal["session_heartbeat"] = "session_heartbeat"


class FinishReason(WireModel):
    type: Literal["success", "errored", "interrupted"]


class SessionFinishRequest(WireModel):
    """Body of `POST /api/v1/sessions/{id}/finish`."""

    reason: FinishReason | None = None
    detail: str | None = None


class TelemetrySendRequest(WireModel):
    """A telemetry batch; events stay free-form dicts because tether only discards them."""

    events: list[dict[str, Any]] = Field(default_factory=list)
    platform: str | None = None
    sdk_version: str | None = None
    session_id: str | None = None
    process_uuid: str | None = None


class TelemetryResponse(WireModel):
    status: Literal["accepted"] = "accepted"


class SupportedModel(WireModel):
    model_name: str | None = None
    max_context_length: NonNegativeInt | None = None
    trainable: bool | None = None
    sampleable: bool | None = None


class GetServerCapabilitiesResponse(WireModel):
    supported_models: list[SupportedModel]


# ------------------------------------------------------------------ futures (§4)


class UntypedAPIFuture(WireModel):
    """What every async submit answers. asample must fill `sample_sequence_ids` (one per sample)."""

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


class FutureRetrieveRequest(WireModel):
    request_id: str
    allow_metadata_only: bool = False


class TryAgainResponse(WireModel):
    """The long-poll timed out; the SDK re-polls at once."""

    request_id: str
    type: Literal["try_again"] = "try_again"
    queue_state: Literal["active", "paused_capacity", "paused_rate_limit"] = "active"
    queue_state_reason: str | None = None


class CompleteMetadataResponse(WireModel):
    """Only while `allow_metadata_only`: the result exists and is this many bytes."""

    status: Literal["complete_metadata"] = "complete_metadata"
    response_payload_size: NonNegativeInt


class RequestFailedResponse(WireModel):
    """A failed future; the SDK raises RequestFailedError(category)."""

    error: str
    category: Literal["unknown", "server", "user"]


class CancelFutureRequest(WireModel):
    request_id: str


class SamplingSessionFuturesTarget(WireModel):
    sampling_session_id: str
    cloned_sampler_id: Int64 = 0
    type: Literal["sampling_session"] = "sampling_session"


class FuturesRetrieveRequest(WireModel):
    target: SamplingSessionFuturesTarget
    prev_cursor: Int64 = 0
    timeout: float | None = None
    """None = long poll; 0 = acknowledge only, answer at once."""
    retrieved_request_ids: list[str] = Field(default_factory=list)


class FutureFinished(WireModel):
    request_id: str
    state: Literal["finished"] = "finished"
    response_payload_uncompressed_size: NonNegativeInt | None = None


class FutureFailed(WireModel):
    request_id: str
    state: Literal["failed"] = "failed"


class FuturesRetrieveResponse(WireModel):
    completions: list[Annotated[FutureFinished | FutureFailed, Field(discriminator="state")]]
    cursor: Int64
