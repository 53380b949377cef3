"""Pydantic models of the Tinker protocol's JSON bodies (tinker-protocol.md §3, §4) and tether's
JSON extensions (docs/INTERFACES.md).

Requests and responses share one vocabulary so the server validates what the SDK sends and the
SDK validates what the server answers. Required fields follow the official SDK 0.38 exactly
(a response missing one breaks the official client); unknown fields are ignored. Numeric bounds
the hosted service enforces server-side (TTL range, Adam hyperparameters, sampling parameters)
are checked here, once, so a bad value becomes a `UserInputError` naming the field via
`parse_wire`.

The REST catalogue models (training runs, checkpoints, sessions) live in `tether.types.wire_rest`
and are re-exported here. Protobuf bodies (forward_backward, its outputs, sample results) are in
`tether.types.proto`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AliasChoices, ConfigDict, Field, model_validator

from tether.types.errors import UserInputError
from tether.types.wire_base import WireModel, dump_wire, parse_wire
from tether.types.wire_rest import (
    AssignSessionProjectRequest,
    Checkpoint,
    CheckpointsListResponse,
    CopyWeightsRequest,
    CopyWeightsResponse,
    Cursor,
    ErrorResponse,
    ExternalWeightsUrlsResponse,
    GetSessionResponse,
    ListSessionsResponse,
    SessionTraceExportResponse,
    SetCheckpointTtlRequest,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoRequest,
    WeightsInfoResponse,
)

__all__ = [
    # base
    "WireModel",
    "parse_wire",
    "dump_wire",
    "MIN_TTL_SECONDS",
    "MAX_TTL_SECONDS",
    # service / session
    "ClientConfigRequest",
    "ClientConfigResponse",
    "ClientDynamicConfigResponse",
    "HealthResponse",
    "CreateSessionRequest",
    "CreateSessionResponse",
    "SessionHeartbeatRequest",
    "SessionHeartbeatResponse",
    "FinishReason",
    "SessionFinishRequest",
    "TelemetrySendRequest",
    "TelemetryResponse",
    "SupportedModel",
    "GetServerCapabilitiesResponse",
    # training
    "LoraConfig",
    "OptimizerConfig",
    "CreateModelRequest",
    "CreateModelResponse",
    "GetInfoRequest",
    "ModelData",
    "GetInfoResponse",
    "AdamParams",
    "OptimStepRequest",
    "OptimStepResponse",
    "SaveWeightsRequest",
    "SaveWeightsResponse",
    "SaveWeightsForSamplerRequest",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsExternalRequest",
    "SaveWeightsExternalResponse",
    "LoadWeightsRequest",
    "LoadWeightsResponse",
    "UnloadModelRequest",
    "CreateCustomLossRequest",
    # sampling
    "EncodedTextChunkJson",
    "ImageChunkJson",
    "ImageAssetPointerChunkJson",
    "DmelChunkJson",
    "ModelInputJson",
    "TensorDataJson",
    "SamplingParams",
    "SampleRequest",
    "CreateSamplingSessionRequest",
    "CreateSamplingSessionResponse",
    "GetSamplerResponse",
    "JoinSamplingSessionRequest",
    "JoinSamplingSessionResponse",
    # futures
    "UntypedAPIFuture",
    "FutureRetrieveRequest",
    "TryAgainResponse",
    "CompleteMetadataResponse",
    "RequestFailedResponse",
    "CancelFutureRequest",
    "SamplingSessionFuturesTarget",
    "FuturesRetrieveRequest",
    "FutureFinished",
    "FutureFailed",
    "FuturesRetrieveResponse",
    # tether extensions
    "BackwardFromLogprobGradsRequest",
    "BackwardFromLogprobGradsResponse",
    # REST (wire_rest)
    "Cursor",
    "Checkpoint",
    "CheckpointsListResponse",
    "TrainingRun",
    "TrainingRunsResponse",
    "WeightsInfoRequest",
    "WeightsInfoResponse",
    "CopyWeightsRequest",
    "CopyWeightsResponse",
    "ListSessionsResponse",
    "GetSessionResponse",
    "SetCheckpointTtlRequest",
    "AssignSessionProjectRequest",
    "ExternalWeightsUrlsResponse",
    "SessionTraceExportResponse",
    "ErrorResponse",
]

MIN_TTL_SECONDS = 3600
"""A checkpoint TTL is at least one hour (the hosted service's rule, §5.7)."""
MAX_TTL_SECONDS = 315_576_000
"""... and at most ten years of 365.25 days."""

TtlSeconds = Annotated[int, Field(ge=MIN_TTL_SECONDS, le=MAX_TTL_SECONDS)]
NonNegativeInt = Annotated[int, Field(ge=0)]

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
    tags: list[str]
    user_metadata: dict[str, Any] | None = None
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
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None


class GetServerCapabilitiesResponse(WireModel):
    supported_models: list[SupportedModel]


# ------------------------------------------------------------------ training (§3.2)


class LoraConfig(WireModel):
    rank: NonNegativeInt
    """LoRA rank; tether reads 0 as full fine-tuning."""
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True

    @model_validator(mode="after")
    def _trains_something(self) -> LoraConfig:
        if not (self.train_unembed or self.train_mlp or self.train_attn):
            raise ValueError("at least one of train_mlp, train_attn, train_unembed must be true")
        return self


class OptimizerConfig(WireModel):
    """`{"type": "adamw"}` or another family with its own extra fields (e.g. dimuon's version)."""

    model_config = ConfigDict(extra="allow")
    type: str = "adamw"


class CreateModelRequest(WireModel):
    session_id: str
    model_seq_id: NonNegativeInt
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig = Field(default_factory=OptimizerConfig)
    type: Literal["create_model"] = "create_model"


class CreateModelResponse(WireModel):
    model_id: str
    type: Literal["create_model"] = "create_model"


class GetInfoRequest(WireModel):
    model_id: str
    type: Literal["get_info"] = "get_info"


class ModelData(WireModel):
    arch: str | None = None
    model_name: str | None = None
    """The SDK asserts this is set (get_tokenizer, save_weights_and_get_sampling_client)."""
    tokenizer_id: str | None = None


class GetInfoResponse(WireModel):
    model_id: str
    model_data: ModelData
    type: Literal["get_info"] = "get_info"
    optimizer_config: OptimizerConfig = Field(default_factory=OptimizerConfig)
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None


class AdamParams(WireModel):
    """AdamW hyperparameters (decoupled weight decay); grad_clip_norm 0 disables clipping."""

    learning_rate: float = Field(default=1e-4, ge=0, allow_inf_nan=False)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-12, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    grad_clip_norm: float = Field(default=0.0, ge=0, allow_inf_nan=False)


class OptimStepRequest(WireModel):
    """On the wire the SDK names the params `adam_params` (AdamW) or `optimizer_params` (others).

    With neither present, AdamW defaults apply.
    """

    model_id: str
    seq_id: int | None = None
    adam_params: AdamParams | None = Field(
        default=None, validation_alias=AliasChoices("adam_params", "optim_params")
    )
    optimizer_params: dict[str, Any] | None = None
    type: Literal["optim_step"] = "optim_step"

    @model_validator(mode="after")
    def _default_adam(self) -> OptimStepRequest:
        if self.adam_params is None and self.optimizer_params is None:
            self.adam_params = AdamParams()
        return self


class OptimStepResponse(WireModel):
    metrics: dict[str, float] | None = None


class SaveWeightsRequest(WireModel):
    model_id: str
    path: str | None = None
    """The checkpoint name (not a tinker:// path); the server picks one when absent."""
    seq_id: int | None = None
    ttl_seconds: TtlSeconds | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None
    type: Literal["save_weights"] = "save_weights"


class SaveWeightsResponse(WireModel):
    path: str
    type: Literal["save_weights"] | None = "save_weights"


class SaveWeightsForSamplerRequest(WireModel):
    """Named form (`path` = a name) or ephemeral form (`sampling_session_seq_id`, no path)."""

    model_id: str
    path: str | None = None
    sampling_session_seq_id: NonNegativeInt | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"
    seq_id: int | None = None
    ttl_seconds: TtlSeconds | None = None
    user_metadata: dict[str, str] | None = None
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"

    @model_validator(mode="after")
    def _one_form(self) -> SaveWeightsForSamplerRequest:
        if self.path is None and self.sampling_session_seq_id is None:
            raise ValueError("needs either path (a checkpoint name) or sampling_session_seq_id")
        return self

    @property
    def is_ephemeral(self) -> bool:
        """True for `save_weights_and_get_sampling_client`: answer with a sampling_session_id."""
        return self.path is None


class SaveWeightsForSamplerResponse(WireModel):
    """`path` for the named form, `sampling_session_id` for the ephemeral form (SDK asserts each)."""

    path: str | None = None
    sampling_session_id: str | None = None
    type: Literal["save_weights_for_sampler"] | None = "save_weights_for_sampler"


class SaveWeightsExternalRequest(WireModel):
    model_id: str
    path: str
    seq_id: int | None = None
    ttl_seconds: TtlSeconds | None = None
    age_encryption_recipients: list[str] | None = None
    type: Literal["save_weights_external"] = "save_weights_external"


class SaveWeightsExternalResponse(WireModel):
    path: str
    size_bytes: int | None = None
    type: Literal["save_weights_external"] | None = "save_weights_external"


class LoadWeightsRequest(WireModel):
    """Create-via-load (`session_id` + `model_seq_id`; the model id is derived) or legacy load
    into an existing model (`model_id` + `seq_id`)."""

    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: NonNegativeInt | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    path: str
    optimizer: bool
    optimizer_config: OptimizerConfig | None = None
    weights_access_token: str | None = None
    type: Literal["load_weights"] = "load_weights"

    @model_validator(mode="after")
    def _one_mode(self) -> LoadWeightsRequest:
        creates = self.session_id is not None or self.model_seq_id is not None
        if creates and self.model_id is not None:
            raise ValueError("give either session_id + model_seq_id or model_id, not both")
        if creates and (self.session_id is None or self.model_seq_id is None):
            raise ValueError("create-via-load needs both session_id and model_seq_id")
        if not creates and self.model_id is None:
            raise ValueError("needs session_id + model_seq_id or model_id")
        return self

    @property
    def creates_model(self) -> bool:
        """True for create-via-load: the load is the new model's first operation."""
        return self.model_id is None


class LoadWeightsResponse(WireModel):
    path: str | None = None
    model_id: str | None = None
    type: Literal["load_weights"] | None = "load_weights"


class UnloadModelRequest(WireModel):
    model_id: str
    type: Literal["unload_model"] = "unload_model"


class CreateCustomLossRequest(WireModel):
    """A traced custom loss (only sent with `custom_loss_server_side`); the graph stays opaque."""

    session_id: str
    custom_loss_seq_id: int
    name: str
    inputs: list[dict[str, Any]]
    graph: dict[str, Any]
    type: Literal["create_custom_loss"] = "create_custom_loss"


# ------------------------------------------------------------------ sampling (§3.3, §5)


class EncodedTextChunkJson(WireModel):
    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"


class ImageChunkJson(WireModel):
    data: str
    """Base64 image bytes."""
    format: Literal["png", "jpeg"]
    expected_tokens: int | None = None
    type: Literal["image"] = "image"


class ImageAssetPointerChunkJson(WireModel):
    format: Literal["png", "jpeg"]
    location: str
    expected_tokens: int | None = None
    type: Literal["image_asset_pointer"] = "image_asset_pointer"


class DmelChunkJson(WireModel):
    dmel: str
    type: Literal["dmel"] = "dmel"


ChunkJson = Annotated[
    EncodedTextChunkJson | ImageChunkJson | ImageAssetPointerChunkJson | DmelChunkJson,
    Field(discriminator="type"),
]


class ModelInputJson(WireModel):
    chunks: list[ChunkJson]

    def to_tokens(self) -> list[int]:
        """All token ids; UserInputError if a chunk is not text (tether samples text only)."""
        tokens: list[int] = []
        for index, chunk in enumerate(self.chunks):
            if not isinstance(chunk, EncodedTextChunkJson):
                raise UserInputError(f"{chunk.type} chunks are not supported", field=f"prompt.chunks.{index}")
            tokens.extend(chunk.tokens)
        return tokens

    @classmethod
    def from_tokens(cls, tokens: list[int]) -> ModelInputJson:
        return cls(chunks=[EncodedTextChunkJson(tokens=list(tokens))])


class TensorDataJson(WireModel):
    """TensorData in JSON: flat data, dtype, optional shape (absent = 1-D), optional CSR layout."""

    data: list[float] | list[int]
    dtype: Literal["float32", "int64"]
    shape: list[int] | None = None
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None

    def to_numpy(
        self, pad_value: float = 0, *, field: str = "tensor", datum_index: int | None = None
    ) -> np.ndarray:
        """The dense array; unlisted sparse cells take `pad_value`. Inconsistent data → UserInputError."""
        dtype = np.float32 if self.dtype == "float32" else np.int64
        values = np.asarray(self.data, dtype=dtype)
        if self.sparse_crow_indices is None:
            if self.shape is None:
                return values
            if math.prod(self.shape) != values.size or any(d < 0 for d in self.shape):
                raise UserInputError(
                    f"{values.size} values do not fill shape {self.shape}",
                    field=field,
                    datum_index=datum_index,
                )
            return values.reshape(self.shape)
        shape = self.shape or []
        crow = np.asarray(self.sparse_crow_indices, dtype=np.int64)
        col = np.asarray(self.sparse_col_indices or [], dtype=np.int64)
        if (
            len(shape) != 2
            or crow.size != shape[0] + 1
            or (crow.size and crow[0] != 0)
            or np.any(np.diff(crow) < 0)
        ):
            raise UserInputError("invalid sparse CSR layout", field=field, datum_index=datum_index)
        if (
            col.size != values.size
            or crow[-1] != values.size
            or (col.size and (col.min() < 0 or col.max() >= shape[1]))
        ):
            raise UserInputError(
                "sparse CSR indices do not match the values", field=field, datum_index=datum_index
            )
        dense = np.full(shape, pad_value, dtype=dtype)
        dense[np.repeat(np.arange(shape[0]), np.diff(crow)), col] = values
        return dense

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorDataJson:
        array = np.asarray(array)
        dtype: Literal["float32", "int64"] = "float32" if np.issubdtype(array.dtype, np.floating) else "int64"
        return cls(data=array.reshape(-1).tolist(), dtype=dtype, shape=list(array.shape))


class SamplingParams(WireModel):
    """`stop`: None keeps EOS stopping; [] disables every stop (even EOS); strings or token ids."""

    max_tokens: NonNegativeInt | None = None
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    top_k: int = Field(default=-1, ge=-1)
    top_p: float = Field(default=1.0, gt=0, le=1)

    @property
    def stop_strings(self) -> list[str] | None:
        if isinstance(self.stop, str):
            return [self.stop]
        if isinstance(self.stop, list) and self.stop and isinstance(self.stop[0], str):
            return list(self.stop)  # type: ignore[arg-type]
        return None

    @property
    def stop_token_ids(self) -> list[int] | None:
        if isinstance(self.stop, list) and self.stop and isinstance(self.stop[0], int):
            return list(self.stop)  # type: ignore[arg-type]
        return None


class SampleRequest(WireModel):
    num_samples: int = Field(default=1, ge=1)
    prompt: ModelInputJson
    sampling_params: SamplingParams
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: NonNegativeInt = 0
    topk_sample_logprobs: NonNegativeInt = 0
    target_prompt_logprobs: TensorDataJson | None = None
    prompt_alt_tokens_k: NonNegativeInt = 0
    prompt_logprobs_last_n: int | None = Field(default=None, ge=1)
    record_stability_info: bool | None = None
    type: Literal["sample"] = "sample"


class CreateSamplingSessionRequest(WireModel):
    session_id: str
    sampling_session_seq_id: NonNegativeInt
    base_model: str | None = None
    model_path: str | None = None
    type: Literal["create_sampling_session"] = "create_sampling_session"


class CreateSamplingSessionResponse(WireModel):
    sampling_session_id: str
    type: Literal["create_sampling_session"] = "create_sampling_session"


class GetSamplerResponse(WireModel):
    sampler_id: str
    base_model: str
    model_path: str | None = None


class JoinSamplingSessionRequest(WireModel):
    sampling_session_id: str
    type: Literal["join_sampling_session"] = "join_sampling_session"


class JoinSamplingSessionResponse(WireModel):
    client_counter: int
    type: Literal["join_sampling_session"] = "join_sampling_session"


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
    response_payload_size: int


class RequestFailedResponse(WireModel):
    """A failed future; the SDK raises RequestFailedError(category)."""

    error: str
    category: Literal["unknown", "server", "user"]


class CancelFutureRequest(WireModel):
    request_id: str


class SamplingSessionFuturesTarget(WireModel):
    sampling_session_id: str
    cloned_sampler_id: int = 0
    type: Literal["sampling_session"] = "sampling_session"


class FuturesRetrieveRequest(WireModel):
    target: SamplingSessionFuturesTarget
    prev_cursor: int = 0
    timeout: float | None = None
    """None = long poll; 0 = acknowledge only, answer at once."""
    retrieved_request_ids: list[str] = Field(default_factory=list)


class FutureFinished(WireModel):
    request_id: str
    state: Literal["finished"] = "finished"
    response_payload_uncompressed_size: int | None = None


class FutureFailed(WireModel):
    request_id: str
    state: Literal["failed"] = "failed"


class FuturesRetrieveResponse(WireModel):
    completions: list[Annotated[FutureFinished | FutureFailed, Field(discriminator="state")]]
    cursor: int


# ------------------------------------------------------------------ tether extensions


class BackwardFromLogprobGradsRequest(WireModel):
    """Second half of the one-pass custom loss: d loss / d logprobs per datum, chained through the
    graph kept by `POST /api/v1/tether/forward_keep_graph` (whose request id is `graph_id`)."""

    model_id: str
    seq_id: int
    graph_id: str
    logprob_grads: list[TensorDataJson]
    type: Literal["backward_from_logprob_grads"] = "backward_from_logprob_grads"


class BackwardFromLogprobGradsResponse(WireModel):
    metrics: dict[str, float] = Field(default_factory=dict)
