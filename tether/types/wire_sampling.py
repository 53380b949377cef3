"""JSON bodies of the Tinker protocol's sampling endpoints (tinker-protocol.md §3.3, §5.1, §5.2,
§5.6), including the JSON form of TensorData. Re-exported by `tether.types.wire`."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from tether.types.errors import UserInputError
from tether.types.wire_base import (
    MAX_DENSE_BYTES,
    MAX_INT64,
    Int64,
    NonNegativeInt,
    ParamsModel,
    Seed,
    WireModel,
)

# ------------------------------------------------------------------ sampling (§3.3, §5)


class EncodedTextChunkJson(WireModel):
    tokens: list[Int64]
    type: Literal["encoded_text"] = "encoded_text"


class ImageChunkJson(WireModel):
    data: str
    """Base64 image bytes."""
    format: Literal["png", "jpeg"]
    expected_tokens: NonNegativeInt | None = None
    type: Literal["image"] = "image"


class ImageAssetPointerChunkJson(WireModel):
    format: Literal["png", "jpeg"]
    location: str
    expected_tokens: NonNegativeInt | None = None
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

    data: list[float] | list[Int64]
    dtype: Literal["float32", "int64"]
    shape: list[NonNegativeInt] | None = None
    sparse_crow_indices: list[Int64] | None = None
    sparse_col_indices: list[Int64] | None = None

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
        if (
            len(shape) == 2 and shape[0] * shape[1] * np.dtype(dtype).itemsize > MAX_DENSE_BYTES
        ):  # no overflow
            raise UserInputError(
                f"sparse tensor of shape {shape} would densify to more than {MAX_DENSE_BYTES} bytes",
                field=field,
                datum_index=datum_index,
            )
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


class SamplingParams(ParamsModel):
    """`stop`: None keeps EOS stopping; [] disables every stop (even EOS); strings or token ids.

    The one definition: the SDK's user type, the sample body's field, and what the server reads.
    """

    max_tokens: NonNegativeInt | None = None
    seed: Seed | None = None
    stop: str | list[str] | list[Int64] | None = None
    temperature: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    top_k: int = Field(default=-1, ge=-1, le=MAX_INT64)
    top_p: float = Field(default=1.0, gt=0, le=1)

    @property
    def stop_strings(self) -> list[str] | None:
        if isinstance(self.stop, str):
            return [self.stop]
        if isinstance(self.stop, list) and self.stop and isinstance(self.stop[0], str):
            return list(self.stop)
        return None

    @property
    def stop_token_ids(self) -> list[int] | None:
        if isinstance(self.stop, list) and self.stop and isinstance(self.stop[0], int):
            return list(self.stop)
        return None


class SampleRequest(WireModel):
    num_samples: int = Field(default=1, ge=1, le=MAX_INT64)
    prompt: ModelInputJson
    sampling_params: SamplingParams
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: Int64 | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: NonNegativeInt = 0
    topk_sample_logprobs: NonNegativeInt = 0
    target_prompt_logprobs: TensorDataJson | None = None
    prompt_alt_tokens_k: NonNegativeInt = 0
    prompt_logprobs_last_n: int | None = Field(default=None, ge=1, le=MAX_INT64)
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
    client_counter: NonNegativeInt
    type: Literal["join_sampling_session"] = "join_sampling_session"
