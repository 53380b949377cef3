"""The user-facing data types of the tether SDK, shaped like the Tinker SDK's.

Code written against `tinker.types` ports by changing the import: the names, fields, defaults and
helper methods match where the two overlap. Every constructor that takes one of these types also
takes the `tinker` package's object of the same name (converted by duck typing, so the `tinker`
package is never imported here) and plain Python where the Tinker SDK accepts it.

The parameters (`AdamParams`, `SamplingParams`, `LoraConfig`) and the JSON results (catalogue
entries, `GetInfoResponse`, `OptimStepResponse`, ...) are the protocol's wire models from
`tether.types.wire_*`, re-exported: one definition serves the server, the SDK and user code. The
inputs are defined here, because they convert from numpy, torch and `tinker` objects and are
frozen. This module knows nothing about HTTP or
protobuf (the client converts to the wire), and imports torch only inside the methods that
convert to or from torch tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from tether.types.errors import UserInputError
from tether.types.wire_base import WireModel
from tether.types.wire_rest import (
    Checkpoint,
    CheckpointsListResponse,
    Cursor,
    GetSessionResponse,
    ListSessionsResponse,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoResponse,
)
from tether.types.wire_sampling import GetSamplerResponse, SamplingParams
from tether.types.wire_session import GetServerCapabilitiesResponse, SupportedModel
from tether.types.wire_training import (
    AdamParams,
    GetInfoResponse,
    GradAccNormalization,
    LoadWeightsResponse,
    LoraConfig,
    ModelData,
    OptimStepResponse,
    SaveWeightsResponse,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "TensorDtype",
    "LossFnType",
    "StopReason",
    # inputs
    "EncodedTextChunk",
    "ModelInput",
    "TensorData",
    "Datum",
    "PromptProvenanceSpan",
    "SampledProvenanceSpan",
    # parameters
    "AdamParams",
    "GradAccNormalization",
    "SamplingParams",
    "LoraConfig",
    # results
    "ForwardBackwardOutput",
    "OptimStepResponse",
    "SaveWeightsResponse",
    "SaveWeightsForSamplerResponse",
    "LoadWeightsResponse",
    "ModelData",
    "GetInfoResponse",
    "SupportedModel",
    "GetServerCapabilitiesResponse",
    "SampledSequence",
    "SampleResponse",
    # catalogue (RestClient)
    "Checkpoint",
    "Cursor",
    "CheckpointsListResponse",
    "TrainingRun",
    "TrainingRunsResponse",
    "GetSessionResponse",
    "ListSessionsResponse",
    "GetSamplerResponse",
    "WeightsInfoResponse",
]

TensorDtype = Literal["float32", "int64"]
LossFnType = Literal[
    "cross_entropy",
    "importance_sampling",
    "ppo",
    "cispo",
    "dro",
    "gspo",
    "reinforce",
    "stable_reinforce",
    "custom",
]
StopReason = Literal["stop", "length"]

_NUMPY_DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "int64": np.dtype(np.int64)}

# The dtype a plain Python list gets under each known loss_fn_inputs key (as in the Tinker SDK).
LOSS_FN_INPUT_DTYPES: dict[str, TensorDtype] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "clip_low_threshold": "float32",
    "clip_high_threshold": "float32",
    "sequence_ratio_mask": "float32",
    "sampled_mask": "float32",
}


# ---------------------------------------------------------------------------------------------
# Model inputs


@dataclass(frozen=True)
class EncodedTextChunk:
    """A run of token ids, the only chunk kind tether's engines consume."""

    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", [int(t) for t in self.tokens])

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class ModelInput:
    """What the model reads: the concatenation of its chunks, in order."""

    chunks: list[EncodedTextChunk] = field(default_factory=list)

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunks", [_coerce_chunk(c) for c in self.chunks])

    @classmethod
    def from_ints(cls, tokens: Iterable[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=list(tokens))])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    @classmethod
    def coerce(cls, value: Any) -> ModelInput:
        """Accept a ModelInput, the `tinker` package's ModelInput, or a plain list of token ids."""
        if isinstance(value, ModelInput):
            return value
        if hasattr(value, "chunks"):
            return cls(chunks=list(value.chunks))
        if isinstance(value, Sequence) and not isinstance(value, str | bytes):
            return cls.from_ints(value)
        raise UserInputError(f"expected a ModelInput, got {type(value).__name__}", field="model_input")

    def to_ints(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk.tokens]

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: EncodedTextChunk) -> ModelInput:
        """A new ModelInput with `chunk` added at the end (inputs are immutable)."""
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk(tokens=[token]))


def _coerce_chunk(chunk: Any) -> EncodedTextChunk:
    if isinstance(chunk, EncodedTextChunk):
        return chunk
    kind = getattr(chunk, "type", None) if not isinstance(chunk, Mapping) else chunk.get("type")
    tokens = getattr(chunk, "tokens", None) if not isinstance(chunk, Mapping) else chunk.get("tokens")
    if tokens is None or kind not in (None, "encoded_text"):
        raise UserInputError(
            f"only encoded_text chunks are supported, got {kind or type(chunk).__name__}",
            field="model_input",
        )
    return EncodedTextChunk(tokens=list(tokens))


# ---------------------------------------------------------------------------------------------
# Tensors


class TensorData:
    """A dense float32 or int64 array with its shape: the unit of `loss_fn_inputs` and outputs.

    Stored as a numpy array; `data` (flat list) and `shape` are views of it, as in the Tinker SDK.
    """

    __slots__ = ("_array",)

    def __init__(
        self, data: Any = None, dtype: TensorDtype | None = None, shape: Sequence[int] | None = None
    ) -> None:
        if dtype not in _NUMPY_DTYPES:
            raise UserInputError(f"dtype must be 'float32' or 'int64', got {dtype!r}", field="dtype")
        array = np.asarray([] if data is None else data, dtype=_NUMPY_DTYPES[dtype])
        if shape is not None and list(array.shape) != list(shape):
            if int(np.prod(shape)) != array.size:
                raise UserInputError(f"{array.size} values do not fill shape {list(shape)}", field="shape")
            array = array.reshape(list(shape))
        self._array = array

    @property
    def dtype(self) -> TensorDtype:
        return "float32" if self._array.dtype == np.float32 else "int64"

    @property
    def shape(self) -> list[int]:
        return list(self._array.shape)

    @property
    def data(self) -> list[Any]:
        return self._array.reshape(-1).tolist()

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        """Floats become float32 and integers (and bools) int64, the only dtypes on the wire."""
        array = np.asarray(array)
        if array.dtype.kind == "f":
            dtype: TensorDtype = "float32"
        elif array.dtype.kind in "iub":
            dtype = "int64"
        else:
            raise UserInputError(f"unsupported array dtype {array.dtype}", field="dtype")
        return cls(array, dtype, list(array.shape))

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        return cls.from_numpy(tensor.contiguous().numpy())

    @classmethod
    def coerce(cls, value: Any, *, key: str = "tensor") -> TensorData:
        """Accept TensorData, the `tinker` TensorData, numpy, torch, or a plain list under a known key."""
        if isinstance(value, TensorData):
            return value
        if isinstance(value, np.ndarray):
            return cls.from_numpy(value)
        if type(value).__module__.startswith("torch"):
            return cls.from_torch(value)
        if hasattr(value, "to_numpy") and hasattr(value, "dtype"):
            return cls(value.to_numpy(), cast(TensorDtype, str(value.dtype)), None)  # __init__ checks it
        if isinstance(value, list | tuple):
            if key not in LOSS_FN_INPUT_DTYPES:
                raise UserInputError(
                    "a plain list is only accepted for the keys "
                    f"{sorted(LOSS_FN_INPUT_DTYPES)}; pass numpy, torch or TensorData",
                    field=key,
                )
            try:
                return cls(value, LOSS_FN_INPUT_DTYPES[key], None)
            except (ValueError, TypeError) as exc:
                raise UserInputError(f"not a rectangular numeric array: {exc}", field=key) from exc
        raise UserInputError(f"cannot convert {type(value).__name__} to TensorData", field=key)

    def to_numpy(self) -> np.ndarray:
        return self._array

    def to_torch(self) -> torch.Tensor:
        import torch

        return torch.from_numpy(self._array.copy())

    def tolist(self) -> list[Any]:
        return self._array.tolist()

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, TensorData)
            and self.dtype == other.dtype
            and self.shape == other.shape
            and bool(np.array_equal(self._array, other._array))
        )

    def __repr__(self) -> str:
        return f"TensorData(dtype={self.dtype!r}, shape={self.shape}, data={self.data[:8]}...)"


# ---------------------------------------------------------------------------------------------
# Datums


@dataclass(frozen=True, kw_only=True)
class PromptProvenanceSpan:
    """A run of datum positions that are positions `[offset, offset + length)` of the prompt of the
    sample request that returned `sequence_id`."""

    sequence_id: str
    offset: int = 0
    length: int


@dataclass(frozen=True, kw_only=True)
class SampledProvenanceSpan:
    """A run of datum positions that are positions `[offset, offset + length)` of the sampled tokens
    of the sequence `sequence_id`."""

    sequence_id: str
    offset: int = 0
    length: int


ProvenanceSpan = PromptProvenanceSpan | SampledProvenanceSpan


def _coerce_span(span: Any, field_name: str) -> ProvenanceSpan:
    """Accept either span type, or the `tinker` package's span of the same class name."""
    if isinstance(span, PromptProvenanceSpan | SampledProvenanceSpan):
        return span
    name = type(span).__name__
    sequence_id, offset = str(getattr(span, "sequence_id", "")), int(getattr(span, "offset", 0))
    if name == "PromptProvenanceSpan":
        return PromptProvenanceSpan(sequence_id=sequence_id, offset=offset, length=int(span.length))
    if name == "SampledProvenanceSpan":
        return SampledProvenanceSpan(sequence_id=sequence_id, offset=offset, length=int(span.length))
    raise UserInputError(
        f"entries must be PromptProvenanceSpan or SampledProvenanceSpan, got {name}", field=field_name
    )


@dataclass(frozen=True)
class Datum:
    """One training example: the model input and the per-token inputs of the loss.

    Position i of `model_input` predicts `loss_fn_inputs["target_tokens"][i]`. Plain lists, numpy
    arrays, torch tensors and `tinker` TensorData are converted to TensorData on construction.
    The provenance spans (both or neither; attach them with `with_provenance`) name the sampled
    sequence behind every input position and target, as `stable_reinforce` requires.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = field(default_factory=dict)
    model_input_spans: list[ProvenanceSpan] | None = None
    loss_fn_input_spans: list[ProvenanceSpan] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_input", ModelInput.coerce(self.model_input))
        object.__setattr__(
            self,
            "loss_fn_inputs",
            {str(k): TensorData.coerce(v, key=str(k)) for k, v in dict(self.loss_fn_inputs).items()},
        )
        for name in ("model_input_spans", "loss_fn_input_spans"):
            spans = getattr(self, name)
            if spans is not None:
                object.__setattr__(self, name, [_coerce_span(s, name) for s in spans])
        if (self.model_input_spans is None) != (self.loss_fn_input_spans is None):
            raise UserInputError(
                "provenance comes as a pair: set both span lists or neither", field="model_input_spans"
            )

    def with_provenance(
        self, model_input: Sequence[ProvenanceSpan], loss_fn_inputs: Sequence[ProvenanceSpan]
    ) -> Datum:
        """A copy carrying provenance: `model_input` runs tile the input tokens, `loss_fn_inputs` runs
        tile `target_tokens` (UserInputError naming the field when their lengths do not add up)."""
        targets = self.loss_fn_inputs.get("target_tokens")
        checks = [("model_input_spans", model_input, self.model_input.length)]
        if targets is not None and len(targets.shape) == 1:
            checks.append(("loss_fn_input_spans", loss_fn_inputs, targets.shape[0]))
        for name, spans, expected in checks:
            total = sum(int(span.length) for span in spans)
            if total != expected:
                raise UserInputError(
                    f"spans cover {total} positions but the field has {expected}; the runs must tile it exactly",
                    field=name,
                )
        return Datum(
            model_input=self.model_input,
            loss_fn_inputs=self.loss_fn_inputs,
            model_input_spans=list(model_input),
            loss_fn_input_spans=list(loss_fn_inputs),
        )

    @classmethod
    def coerce(cls, value: Any) -> Datum:
        """Accept a Datum or the `tinker` package's Datum (its provenance spans included)."""
        if isinstance(value, Datum):
            return value
        if hasattr(value, "model_input") and hasattr(value, "loss_fn_inputs"):
            return cls(
                model_input=value.model_input,
                loss_fn_inputs=dict(value.loss_fn_inputs),
                model_input_spans=getattr(value, "model_input_spans", None),
                loss_fn_input_spans=getattr(value, "loss_fn_input_spans", None),
            )
        raise UserInputError(f"expected a Datum, got {type(value).__name__}", field="data")


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class ForwardBackwardOutput:
    """Per-datum outputs (`logprobs`, ...) in request order and metrics keyed `name:reduction`."""

    loss_fn_output_type: str
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float] = field(default_factory=dict)


class SaveWeightsForSamplerResponse(WireModel):
    """The named save's answer: `path` is required here, unlike the wire model of the same name,
    which also carries the ephemeral form's `sampling_session_id` (the SDK answers that form with
    a SamplingClient instead)."""

    path: str


@dataclass(frozen=True)
class SampledSequence:
    """One generated continuation: its tokens, their logprobs (if computed) and why it stopped."""

    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None
    sequence_id: str | None = None


@dataclass(frozen=True)
class SampleResponse:
    """`prompt_logprobs[i]` is log p(prompt[i] | prompt[:i]); None where not computed (index 0)."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
