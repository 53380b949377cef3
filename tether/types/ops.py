"""Trainer operations and their results: the typed messages the server hands a trainer.

One frozen type per verb, named as the SDK method and the route that build it
(`forward_backward` -> `/api/v1/forward_backward` -> `ForwardBackward` -> `OpExecutor.forward_backward`).
A route validates the request and builds an op; a trainer (in this process, or a `tether trainer`
process across a socket) executes it and answers with one of the result types below, or with
`OpFailure`. Ops and results are plain data (numbers, strings, numpy arrays, the wire parameter
models), so `tether.types.op_codec` can carry them across a process boundary without pickle.

Arrays: token ids are int64, everything else float32, in the shapes the docstrings give.
This module knows nothing about torch, HTTP, the catalogue or where a checkpoint lives on disk.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator

from tether.types import errors
from tether.types.errors import ServerError, TetherError, UserInputError
from tether.types.wire import AdamParams, GradAccMode, LoraConfig, SamplingParams

_ARRAY_KINDS = "biuf"


def _check_array(value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(value).__name__}")
    if value.dtype.kind not in _ARRAY_KINDS:
        raise ValueError(f"expected a numeric array, got dtype {value.dtype}")
    return value


NDArray = Annotated[
    np.ndarray, PlainValidator(_check_array), PlainSerializer(lambda a: a, when_used="always")
]
"""A numeric numpy array (validated as such; carried as raw bytes by the op codec)."""


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ------------------------------------------------------------------------------------------ ops


class TrainingDatum(_Message):
    """One datum as the trainer takes it: chunks already flattened to tokens."""

    input_tokens: NDArray
    """int64 (N,): position i predicts `loss_fn_inputs["target_tokens"][i]`."""
    loss_fn_inputs: dict[str, NDArray] = Field(default_factory=dict)
    """`target_tokens` int64 (N,) or (N, K); `weights`, `logprobs`, `advantages` float32 of the same shape."""


class CreateModel(_Message):
    """Create a training model: a LoRA adapter on the base, or (no `lora_config`) a full fine-tuning copy."""

    type: Literal["create_model"] = "create_model"
    model_id: str
    lora_config: LoraConfig | None = None
    """None (or rank 0) means full fine-tuning."""


class DeleteModel(_Message):
    """Free a training model and everything it holds (gradients, optimizer state, kept graphs)."""

    type: Literal["delete_model"] = "delete_model"
    model_id: str


class Forward(_Message):
    """Forward pass with a built-in loss; nothing is accumulated."""

    type: Literal["forward"] = "forward"
    model_id: str
    data: list[TrainingDatum]
    loss_fn: str
    loss_fn_config: dict[str, float] | None = None


class ForwardBackward(_Message):
    """Forward and backward with a built-in loss; gradients add up until the next `OptimStep`."""

    type: Literal["forward_backward"] = "forward_backward"
    model_id: str
    data: list[TrainingDatum]
    loss_fn: str
    loss_fn_config: dict[str, float] | None = None


class OptimStep(_Message):
    """One AdamW step on the accumulated gradients, which it then clears."""

    type: Literal["optim_step"] = "optim_step"
    model_id: str
    adam_params: AdamParams
    grad_accumulation_normalization: GradAccMode = "none"
    """Divide the accumulated gradients by the loss tokens or sequences first (`GradAccNormalization`)."""


class ForwardKeepGraph(_Message):
    """tether's one-pass custom loss, part 1: forward and keep the autograd graph as `graph_id`."""

    type: Literal["forward_keep_graph"] = "forward_keep_graph"
    model_id: str
    data: list[TrainingDatum]
    graph_id: str
    ttl_s: float
    """The graph is freed if its backward has not come within this many seconds."""


class BackwardFromLogprobGrads(_Message):
    """Part 2: back-propagate d loss / d logprobs (float32, one array per datum) through a kept graph."""

    type: Literal["backward_from_logprob_grads"] = "backward_from_logprob_grads"
    model_id: str
    graph_id: str
    logprob_grads: list[NDArray]


class SaveState(_Message):
    """Write the model's training state (weights and optimizer) to the checkpoint `path` of `owner`."""

    type: Literal["save_state"] = "save_state"
    model_id: str
    owner: str
    path: str
    """A `tinker://<run>/weights/<name>` path."""
    overwrite: bool = False


class LoadState(_Message):
    """Load a training-state checkpoint into `model_id` (creating the model when `create_model`)."""

    type: Literal["load_state"] = "load_state"
    model_id: str
    owner: str
    """Owner of the checkpoint's files (may differ from the caller's for a published checkpoint)."""
    path: str
    include_optimizer: bool
    create_model: bool


class SaveSamplerWeights(_Message):
    """Export the model's weights for sampling.

    `kind="sampler"` and `"external"` write Hugging Face files (a PEFT adapter for LoRA) at `path`;
    `"ephemeral"` registers a frozen copy with the sampling engine as `sampler_id` and writes nothing.
    """

    type: Literal["save_sampler_weights"] = "save_sampler_weights"
    model_id: str
    kind: Literal["sampler", "external", "ephemeral"]
    owner: str
    path: str | None = None
    sampler_id: str | None = None


class SaveWeightsForSamplerExt(_Message):
    """Write the model's sampler weights as a chain checkpoint: a base, a delta against the run's
    newest chain checkpoint, or a LoRA merged into full weights (`tether.storage.sampler_chain`)."""

    type: Literal["save_weights_for_sampler_ext"] = "save_weights_for_sampler_ext"
    model_id: str
    owner: str
    path: str
    """A `tinker://<run>/sampler_weights/<name>` path."""
    checkpoint_type: Literal["base", "delta", "merged_base"] | None = None
    """None: a base for the run's first chain save, deltas after."""


class CreateSampler(_Message):
    """Register the weights of a checkpoint (`sampler_weights/` or LoRA/full `weights/`) as `sampler_id`."""

    type: Literal["create_sampler"] = "create_sampler"
    sampler_id: str
    owner: str
    path: str


class DeleteSampler(_Message):
    """Unregister a sampler's weights (no-op if it has none)."""

    type: Literal["delete_sampler"] = "delete_sampler"
    sampler_id: str


class Sample(_Message):
    """Sample `num_samples` continuations of `prompt_tokens` from a sampler (None: the base model)."""

    type: Literal["sample"] = "sample"
    sampler_id: str | None
    prompt_tokens: list[int]
    num_samples: int
    sampling_params: SamplingParams
    include_prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0


class DescribeBase(_Message):
    """What the trainer knows about its base model (architecture, tokenizer, sizes)."""

    type: Literal["describe_base"] = "describe_base"


Op = Annotated[
    CreateModel
    | DeleteModel
    | Forward
    | ForwardBackward
    | OptimStep
    | ForwardKeepGraph
    | BackwardFromLogprobGrads
    | SaveState
    | LoadState
    | SaveSamplerWeights
    | SaveWeightsForSamplerExt
    | CreateSampler
    | DeleteSampler
    | Sample
    | DescribeBase,
    Field(discriminator="type"),
]
"""Any trainer operation."""


class CancelSample(_Message):
    """Across a process boundary only: stop the `Sample` op whose envelope carried `target_op_id`.

    The trainer process cancels that op's sampling-engine request (generation stops, its KV cache is
    freed; a request still waiting for admission is simply dropped) and answers the op as cancelled;
    an op that has already finished, or that it never saw, makes this a no-op. A `CancelSample`
    has no answer of its own. Only `Sample` ops are cancellable: a training op (forward, backward,
    optimizer step, checkpoint) must never stop mid-way, since it would leave a model's gradients,
    optimizer state or files half written, so a `CancelSample` naming one is ignored."""

    type: Literal["cancel_sample"] = "cancel_sample"
    target_op_id: int


Message = Annotated[Op | CancelSample, Field(discriminator="type")]
"""What an `OpEnvelope` carries: an op, or the cancellation of an earlier one."""


# -------------------------------------------------------------------------------------- results


class Done(_Message):
    """An op that answers nothing but its success."""

    type: Literal["done"] = "done"


class ForwardOutput(_Message):
    """Per-datum outputs in request order and metrics keyed `name:reduction`."""

    type: Literal["forward_output"] = "forward_output"
    outputs: list[dict[str, NDArray]]
    """Per datum: `logprobs` float32 (shape of target_tokens); `elementwise_loss` for cross_entropy."""
    metrics: dict[str, float]


class MetricsOutput(_Message):
    """Metrics of an optimizer step or a backward (`grad_norm:mean`, `learning_rate:mean`, `loss:sum`)."""

    type: Literal["metrics_output"] = "metrics_output"
    metrics: dict[str, float]


class CheckpointWritten(_Message):
    """A checkpoint's files are complete at `path`."""

    type: Literal["checkpoint_written"] = "checkpoint_written"
    path: str
    """The checkpoint's `tinker://` path."""
    directory: str
    """Where its files are (recorded in the catalogue)."""
    size_bytes: int
    checkpoint_type: str | None = None
    """For chain checkpoints: "base", "delta" or "merged_base"."""
    full_bytes: int | None = None
    """For chain checkpoints: bytes of the weights uncompressed (`size_bytes` is what was stored)."""


class SampledSequenceOutput(_Message):
    tokens: list[int]
    logprobs: list[float]
    stop_reason: Literal["stop", "length"]
    topk_logprobs: list[list[tuple[int, float]]] | None = None


class SampleOutput(_Message):
    type: Literal["sample_output"] = "sample_output"
    sequences: list[SampledSequenceOutput]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    prompt_cache_hit_tokens: int = 0


class BaseModelInfo(_Message):
    type: Literal["base_model_info"] = "base_model_info"
    arch: str | None
    tokenizer_id: str
    """A directory the server can read, or a hub id."""
    vocab_size: int
    max_context_length: int
    eos_token_ids: list[int]


_ERROR_TYPES: dict[str, type[TetherError]] = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, TetherError)
}
"""Every class of the one error hierarchy (`tether.types.errors`), by name."""


class OpFailure(_Message):
    """An op that failed: the error's type, message and, for user errors, the field and datum."""

    type: Literal["op_failure"] = "op_failure"
    error_type: str
    message: str
    field: str | None = None
    datum_index: int | None = None
    http_status: int | None = None
    """The original error's status (a subclass may have its own, e.g. a damaged checkpoint's 422)."""

    @classmethod
    def from_exception(cls, exc: BaseException) -> OpFailure:
        """A subclass travels as its nearest class in `tether.types.errors` (same status and category)."""
        if isinstance(exc, TetherError):
            known = next(k.__name__ for k in type(exc).__mro__ if k.__name__ in _ERROR_TYPES)
            field = getattr(exc, "field", None)
            if known == "UserInputError":  # its message already names the field and datum
                where = field is not None or getattr(exc, "datum_index", None) is not None
                message = exc.message.split(": ", 1)[1] if where else exc.message
            else:
                message = exc.message
            return cls(
                error_type=known,
                message=message,
                field=field,
                datum_index=getattr(exc, "datum_index", None),
                http_status=exc.http_status,
            )
        return cls(error_type="ServerError", message=f"{type(exc).__name__}: {exc}")

    def to_exception(self) -> TetherError:
        cls = _ERROR_TYPES.get(self.error_type, ServerError)
        if cls is UserInputError:
            error: TetherError = UserInputError(self.message, field=self.field, datum_index=self.datum_index)
        else:
            error = cls(self.message)
        if self.http_status is not None and self.http_status != error.http_status:
            error.http_status = self.http_status
        return error


OpResult = Annotated[
    Done | ForwardOutput | MetricsOutput | CheckpointWritten | SampleOutput | BaseModelInfo | OpFailure,
    Field(discriminator="type"),
]
"""Any answer to an op."""


class OpEnvelope(_Message):
    """What crosses the process boundary: an op with its id and its place in its stream's order."""

    op_id: int
    stream: str | None = None
    """The model the op belongs to (ordered by `seq_id`), or None for unordered ops (sampling)."""
    seq_id: int | None = None
    op: Message


class ResultEnvelope(_Message):
    op_id: int
    result: OpResult
