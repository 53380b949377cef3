"""JSON bodies of the Tinker protocol's training endpoints (tinker-protocol.md §3.2) and of tether's
one-pass custom-loss extension (docs/ARCHITECTURE.md). Re-exported by `tether.types.wire`."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import AliasChoices, ConfigDict, Field, field_validator, model_validator

from tether.types.errors import UserInputError
from tether.types.wire_base import (
    Int64,
    NonNegativeInt,
    ParamsModel,
    Seed,
    StrUserMetadata,
    TtlSeconds,
    UserMetadata,
    WireModel,
)
from tether.types.wire_sampling import TensorDataJson

# ------------------------------------------------------------------ training (§3.2)


class LoraConfig(ParamsModel):
    """Which parts of the model get LoRA adapters, and their rank (the SDK's and the wire's type)."""

    rank: NonNegativeInt
    """LoRA rank; tether reads 0 as full fine-tuning. Required, as in the Tinker SDK."""
    seed: Seed | None = None
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
    user_metadata: UserMetadata | None = None
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
    lora_rank: NonNegativeInt | None = None
    model_name: str | None = None


MAX_LEARNING_RATE = 10.0
"""AdamW moves each weight by about the learning rate per step, so anything above this only destroys
the model; larger values are refused. (Weights need no bound beyond staying finite, which every
optimizer step checks: `tether.engine.optimizer`.)"""


class AdamParams(ParamsModel):
    """AdamW hyperparameters (decoupled weight decay); grad_clip_norm 0 disables clipping.

    The one definition: the SDK's user type, the optim_step body's field, and what the server reads.
    Bounds: learning_rate in [0, MAX_LEARNING_RATE]; learning_rate * weight_decay <= 1 (a larger
    decay flips the weights' sign).
    """

    learning_rate: float = Field(default=1e-4, ge=0, le=MAX_LEARNING_RATE, allow_inf_nan=False)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-12, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    grad_clip_norm: float = Field(default=0.0, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _decay_keeps_the_sign(self) -> AdamParams:
        if self.learning_rate * self.weight_decay > 1:
            raise ValueError("weight_decay: must keep learning_rate * weight_decay <= 1")
        return self


GradAccMode = Literal["none", "num_loss_tokens", "num_sequences"]
"""How `optim_step` normalises the gradients accumulated since the last step (the op's field)."""


class GradAccNormalization(StrEnum):
    """`optim_step`'s `grad_accumulation_normalization` (Fireworks' enum of the same name and values).

    Each `forward_backward` adds the gradients of its raw token-sum loss; at `optim_step` the sum
    over all of them since the last step is divided, before clipping and the update, by:
    - NUM_LOSS_TOKENS: the loss tokens accumulated, i.e. the target positions with a non-zero loss
      weight (`weights` where the loss takes them, e.g. cross_entropy; else `advantages`; every
      position for a loss with neither; for the one-pass custom loss, a non-zero d loss / d logprob).
      A position with K targets counts once. The per-token mean of a raw-sum loss.
    - NUM_SEQUENCES: the datums of those calls. The per-sequence mean.
    - NONE (or absent): nothing, for losses that are already means (the Tinker SDK's behaviour).
    A count of 0 divides by 1.
    """

    NONE = "none"
    NUM_LOSS_TOKENS = "num_loss_tokens"
    NUM_SEQUENCES = "num_sequences"

    @classmethod
    def coerce(cls, value: Any) -> GradAccNormalization:
        """This enum from itself, another enum with the same values (Fireworks'), a name or a value
        (any case), or None (NONE). Raises UserInputError naming `grad_accumulation_normalization`."""
        if value is None:
            return cls.NONE
        raw = getattr(value, "value", value)
        if isinstance(raw, str):
            try:
                return cls(raw.lower())
            except ValueError:
                pass
        raise UserInputError(
            f"unknown normalization {raw!r}; expected one of {[m.value for m in cls]} or null",
            field="grad_accumulation_normalization",
        )


class OptimStepRequest(WireModel):
    """On the wire the SDK names the params `adam_params` (AdamW) or `optimizer_params` (others).

    With neither present, AdamW defaults apply. `grad_accumulation_normalization` is a Fireworks
    extension (their SDK sends it in `extra_body`; the Tinker SDK never does): absent = NONE.
    """

    model_id: str
    seq_id: Int64 | None = None
    adam_params: AdamParams | None = Field(
        default=None, validation_alias=AliasChoices("adam_params", "optim_params")
    )
    optimizer_params: dict[str, Any] | None = None
    grad_accumulation_normalization: GradAccNormalization | None = None
    type: Literal["optim_step"] = "optim_step"

    @field_validator("grad_accumulation_normalization", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        """Names and values in any case ("NUM_LOSS_TOKENS", "num_loss_tokens"); others fail as usual."""
        return value.lower() if isinstance(value, str) else value

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
    seq_id: Int64 | None = None
    ttl_seconds: TtlSeconds | None = None
    overwrite: bool = False
    user_metadata: StrUserMetadata | None = None
    type: Literal["save_weights"] = "save_weights"


class SaveWeightsResponse(WireModel):
    path: str
    type: Literal["save_weights"] | None = "save_weights"


class SaveWeightsForSamplerExtRequest(WireModel):
    """tether's `save_weights_for_sampler_ext`: a sampler checkpoint in a chain of base and delta
    checkpoints (fireworks-training-api.md §4.2, §6). `checkpoint_type` None: the run's first chain
    save is a base, later ones deltas against the previous checkpoint."""

    model_id: str
    path: str
    """The checkpoint's name (`sampler_weights/<path>`)."""
    checkpoint_type: Literal["base", "delta", "merged_base"] | None = None
    seq_id: Int64 | None = None
    ttl_seconds: TtlSeconds | None = None
    type: Literal["save_weights_for_sampler_ext"] = "save_weights_for_sampler_ext"


class SaveWeightsForSamplerExtResponse(WireModel):
    path: str
    checkpoint_type: Literal["base", "delta", "merged_base"]
    stored_bytes: int
    """Bytes written (a delta is much smaller than its weights)."""
    full_bytes: int
    """Bytes of the weights uncompressed."""
    type: Literal["save_weights_for_sampler_ext"] = "save_weights_for_sampler_ext"


class SaveWeightsForSamplerRequest(WireModel):
    """Named form (`path` = a name) or ephemeral form (`sampling_session_seq_id`, no path)."""

    model_id: str
    path: str | None = None
    sampling_session_seq_id: NonNegativeInt | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"
    seq_id: Int64 | None = None
    ttl_seconds: TtlSeconds | None = None
    user_metadata: StrUserMetadata | None = None
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
    seq_id: Int64 | None = None
    ttl_seconds: TtlSeconds | None = None
    age_encryption_recipients: list[str] | None = None
    type: Literal["save_weights_external"] = "save_weights_external"


class SaveWeightsExternalResponse(WireModel):
    path: str
    size_bytes: NonNegativeInt | None = None
    type: Literal["save_weights_external"] | None = "save_weights_external"


class LoadWeightsRequest(WireModel):
    """Create-via-load (`session_id` + `model_seq_id`; the model id is derived) or legacy load
    into an existing model (`model_id` + `seq_id`)."""

    model_id: str | None = None
    seq_id: Int64 | None = None
    session_id: str | None = None
    model_seq_id: NonNegativeInt | None = None
    base_model: str | None = None
    user_metadata: UserMetadata | None = None
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
    custom_loss_seq_id: Int64
    name: str
    inputs: list[dict[str, Any]]
    graph: dict[str, Any]
    type: Literal["create_custom_loss"] = "create_custom_loss"


# ------------------------------------------------------------------ tether extensions


class BackwardFromLogprobGradsRequest(WireModel):
    """Second half of the one-pass custom loss: d loss / d logprobs per datum, chained through the
    graph kept by `POST /api/v1/tether/forward_keep_graph` (whose request id is `graph_id`)."""

    model_id: str
    seq_id: Int64
    graph_id: str
    logprob_grads: list[TensorDataJson]
    type: Literal["backward_from_logprob_grads"] = "backward_from_logprob_grads"


class BackwardFromLogprobGradsResponse(WireModel):
    metrics: dict[str, float] = Field(default_factory=dict)
