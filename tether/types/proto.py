"""Codecs between the `tinker_public` protobuf wire format and plain dataclasses of numpy arrays.

Three messages travel as protobuf (tinker-protocol.md §6): the `ForwardBackwardRequest` the SDK
posts, and the `ForwardBackwardOutput` / `SampleResponse` results the server returns. The server
decodes requests with `decode_forward_backward_request` and encodes results with
`encode_forward_backward_output` and `encode_sample_response`; tether's own SDK uses the mirror
functions. Everything here is torch-free: tensors are numpy arrays (float32 / int64).

Decoding validates what the bytes claim (dtypes, byte lengths against shapes, CSR indices) and
raises `UserInputError` naming the field and datum index, because a request body is the caller's
input. Sparse CSR tensors are densified here, so nothing downstream sees the sparse layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import zstandard
from google.protobuf.message import DecodeError

from tether.types import proto_schema as pb
from tether.types.errors import UserInputError

__all__ = [
    "TOPK_MASK_LOGPROB",
    "WireTextChunk",
    "WireImageChunk",
    "WireDmelChunk",
    "WireChunk",
    "WireProvenanceSpan",
    "WireDatum",
    "ForwardBackwardRequestBody",
    "ForwardBackwardOutputBody",
    "WireTopk",
    "WireSampledSequence",
    "SampleResponseBody",
    "encode_forward_backward_request",
    "decode_forward_backward_request",
    "encode_forward_backward_output",
    "decode_forward_backward_output",
    "encode_sample_response",
    "decode_sample_response",
    "topk_from_rows",
    "topk_to_rows",
    "MAX_DECOMPRESSED_BYTES",
    "MAX_DENSE_ELEMENTS",
]

TOPK_MASK_LOGPROB = -99999.0
"""Logprob of an empty top-k cell (token id 0); the SDK reads a row starting with it as None."""

MAX_DECOMPRESSED_BYTES = 1 << 30
"""A zstd request body may not expand past this (1 GiB), so a tiny body cannot exhaust memory."""

MAX_DENSE_ELEMENTS = 1 << 31
"""A sparse tensor may not claim a dense shape larger than this (it is densified on decode)."""

# Pad value of cells a sparse CSR tensor does not list, per loss_fn_inputs key (§5.2).
_SPARSE_PAD_DEFAULT = 0.0

_REQUEST_DTYPES = {pb.DTYPE_FLOAT32: np.dtype(np.float32), pb.DTYPE_INT64: np.dtype(np.int64)}
# Results may also carry int32 and bfloat16 (§6.2); both widen on decode like the SDK does.
_RESULT_DTYPES = {
    pb.DTYPE_FLOAT32: np.dtype(np.float32),
    pb.DTYPE_INT64: np.dtype(np.int64),
    pb.DTYPE_INT32: np.dtype(np.int32),
    pb.DTYPE_BFLOAT16: np.dtype(np.uint16),
}

StopReason = Literal["stop", "length"]


@dataclass
class WireTextChunk:
    """Token ids of one `encoded_text` chunk (int32 on the wire)."""

    tokens: np.ndarray


@dataclass
class WireImageChunk:
    """Raw image bytes of one `image` chunk; tether's engines reject them, the codec keeps them."""

    data: bytes
    format: str
    expected_tokens: int | None = None


@dataclass
class WireDmelChunk:
    """Serialized audio features of one `dmel` chunk."""

    dmel: bytes


WireChunk = WireTextChunk | WireImageChunk | WireDmelChunk


@dataclass
class WireProvenanceSpan:
    """Where a run of tokens came from (`prompt` or `sampled`), for StableReinforce-style losses."""

    kind: Literal["prompt", "sampled"]
    sequence_id: str
    offset: int
    length: int


@dataclass
class WireDatum:
    """One training example as it travels: input chunks plus named loss inputs (dense numpy)."""

    model_input_chunks: list[WireChunk]
    loss_fn_inputs: dict[str, np.ndarray]
    model_input_spans: list[WireProvenanceSpan] | None = None
    loss_fn_input_spans: list[WireProvenanceSpan] | None = None

    def input_tokens(self, datum_index: int | None = None) -> np.ndarray:
        """All input token ids (int64) when every chunk is text; UserInputError otherwise."""
        parts = []
        for chunk in self.model_input_chunks:
            if not isinstance(chunk, WireTextChunk):
                kind = type(chunk).__name__.removeprefix("Wire").removesuffix("Chunk").lower()
                raise UserInputError(
                    f"{kind} chunks are not supported; send token ids",
                    field="model_input",
                    datum_index=datum_index,
                )
            parts.append(np.asarray(chunk.tokens, dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class ForwardBackwardRequestBody:
    """The decoded `/api/v1/forward_backward` body (also used by the forward_keep_graph extension).

    `loss_fn_config` merges the legacy numeric map and `loss_fn_config_v2`; v2 wins on conflicts.
    """

    model_id: str
    seq_id: int
    forward_only: bool
    loss_fn: str
    loss_fn_config: dict[str, float | str] | None
    data: list[WireDatum]


@dataclass
class ForwardBackwardOutputBody:
    """A decoded `ForwardBackwardOutput`: per-datum named arrays, metrics and the output type name."""

    loss_fn_outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]
    loss_fn_output_type: str = "ArrayRecord"


@dataclass
class WireTopk:
    """Top-k logprobs as dense `(length, k)` matrices; empty cells are (0, TOPK_MASK_LOGPROB)."""

    token_ids: np.ndarray
    logprobs: np.ndarray


@dataclass
class WireSampledSequence:
    """One sampled sequence: tokens, optional per-token logprobs and top-k, and why it stopped."""

    tokens: Sequence[int] | np.ndarray
    logprobs: Sequence[float] | np.ndarray | None
    stop_reason: StopReason
    topk_logprobs: WireTopk | None = None


@dataclass
class SampleResponseBody:
    """A `SampleResponse`. `prompt_logprobs` holds None (NaN on the wire) where not computed."""

    sequences: list[WireSampledSequence]
    prompt_logprobs: Sequence[float | None] | np.ndarray | None = None
    topk_prompt_logprobs: WireTopk | None = None
    prompt_cache_hit_tokens: int = 0
    target_prompt_logprobs: np.ndarray | None = None
    prompt_alt_tokens: tuple[np.ndarray, np.ndarray] | None = None
    """(token ids int64 `[len-1, k]`, logprobs float32 `[len-1, k]`) when requested."""


# ---------------------------------------------------------------- helpers


def _maybe_decompress(body: bytes, content_encoding: str | None) -> bytes:
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "zstd":
        raise UserInputError(f"unsupported Content-Encoding {content_encoding!r}", field="content-encoding")
    chunks: list[bytes] = []
    total = 0
    try:
        # Streamed with a running total: the frame's declared size cannot be trusted.
        with zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True) as reader:
            while chunk := reader.read(1 << 20):
                total += len(chunk)
                if total > MAX_DECOMPRESSED_BYTES:
                    raise UserInputError("decompressed body exceeds 1 GiB", field="body")
                chunks.append(chunk)
    except zstandard.ZstdError as exc:
        raise UserInputError(f"invalid zstd body: {exc}", field="body") from exc
    return b"".join(chunks)


def _frombuffer(raw: bytes, dtype: np.dtype, *, field_name: str, datum_index: int | None) -> np.ndarray:
    if len(raw) % dtype.itemsize:
        raise UserInputError(
            f"{len(raw)} bytes is not a whole number of {dtype.name} values",
            field=field_name,
            datum_index=datum_index,
        )
    return np.frombuffer(raw, dtype=dtype).copy()


def _tensor_to_proto(array: np.ndarray):
    """A dense proto Tensor in float32 or int64 (the only dtypes of the public wire)."""
    array = np.asarray(array)
    msg = pb.Tensor()
    if np.issubdtype(array.dtype, np.floating):
        msg.dtype = pb.DTYPE_FLOAT32
        data = array.astype("<f4", copy=False)
    elif np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        msg.dtype = pb.DTYPE_INT64
        data = array.astype("<i8", copy=False)
    else:
        raise TypeError(f"cannot encode {array.dtype} as a tinker Tensor")
    msg.shape.extend(int(d) for d in array.shape)
    msg.dense = np.ascontiguousarray(data).tobytes()
    return msg


def _tensor_from_proto(
    msg, *, field_name: str, datum_index: int | None, sparse_pad: float, dtypes: Mapping[int, np.dtype]
) -> np.ndarray:
    """A dense numpy array from a proto Tensor; sparse CSR cells not listed take `sparse_pad`."""
    dtype = dtypes.get(msg.dtype)
    if dtype is None:
        raise UserInputError(
            f"unsupported tensor dtype enum {msg.dtype}", field=field_name, datum_index=datum_index
        )
    shape = [int(d) for d in msg.shape]
    if any(d < 0 for d in shape):
        raise UserInputError(
            f"negative dimension in shape {shape}", field=field_name, datum_index=datum_index
        )
    if msg.HasField("sparse_csr"):
        values = _widen(
            _frombuffer(msg.sparse_csr.values, dtype, field_name=field_name, datum_index=datum_index),
            msg.dtype,
        )
        crow = _frombuffer(
            msg.sparse_csr.crow_indices, np.dtype("<i8"), field_name=field_name, datum_index=datum_index
        )
        col = _frombuffer(
            msg.sparse_csr.col_indices, np.dtype("<i8"), field_name=field_name, datum_index=datum_index
        )
        return _csr_to_dense(
            values, crow, col, shape, sparse_pad, field_name=field_name, datum_index=datum_index
        )
    values = _widen(_frombuffer(msg.dense, dtype, field_name=field_name, datum_index=datum_index), msg.dtype)
    if not shape:
        # A TensorData built from a plain list may carry no shape: it is 1-D (§5.2).
        return values
    if math.prod(shape) != values.size:
        raise UserInputError(
            f"shape {shape} needs {math.prod(shape)} values but {values.size} were sent",
            field=field_name,
            datum_index=datum_index,
        )
    return values.reshape(shape)


def _widen(values: np.ndarray, dtype_enum: int) -> np.ndarray:
    if dtype_enum == pb.DTYPE_BFLOAT16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    if dtype_enum == pb.DTYPE_INT32:
        return values.astype(np.int64)
    return values


def _csr_to_dense(
    values: np.ndarray,
    crow: np.ndarray,
    col: np.ndarray,
    shape: list[int],
    pad: float,
    *,
    field_name: str,
    datum_index: int | None,
) -> np.ndarray:
    def bad(why: str) -> UserInputError:
        return UserInputError(f"invalid sparse CSR tensor: {why}", field=field_name, datum_index=datum_index)

    if len(shape) != 2:
        raise bad(f"shape must be 2-D, got {shape}")
    rows, cols = shape
    if rows * cols > MAX_DENSE_ELEMENTS:
        raise bad(f"dense shape {shape} exceeds {MAX_DENSE_ELEMENTS} elements")
    if crow.size != rows + 1 or (crow.size and crow[0] != 0) or np.any(np.diff(crow) < 0):
        raise bad("crow_indices must be non-decreasing, start at 0 and have rows+1 entries")
    nnz = int(crow[-1]) if crow.size else 0
    if col.size != nnz or values.size != nnz:
        raise bad(f"{nnz} stored cells but {col.size} column indices and {values.size} values")
    if nnz and (col.min() < 0 or col.max() >= cols):
        raise bad(f"column index out of range [0, {cols})")
    dense = np.full((rows, cols), pad, dtype=values.dtype)
    row_of_cell = np.repeat(np.arange(rows), np.diff(crow))
    dense[row_of_cell, col] = values
    return dense


# ---------------------------------------------------------------- forward_backward request


def encode_forward_backward_request(body: ForwardBackwardRequestBody) -> bytes:
    """Serialize a request exactly as the official SDK does (numeric config dual-written, §6.1)."""
    msg = pb.ForwardBackwardRequest(
        model_id=body.model_id, seq_id=body.seq_id, loss_fn=body.loss_fn, forward_only=body.forward_only
    )
    for key, value in (body.loss_fn_config or {}).items():
        if isinstance(value, str):
            msg.loss_fn_config_v2[key].text = value
        else:
            msg.loss_fn_config[key] = float(value)
            msg.loss_fn_config_v2[key].number = float(value)
    for datum in body.data:
        datum_msg = msg.data.add()
        for chunk in datum.model_input_chunks:
            chunk_msg = datum_msg.model_input.add()
            if isinstance(chunk, WireTextChunk):
                chunk_msg.encoded_text.tokens = np.asarray(chunk.tokens, dtype="<i4").tobytes()
            elif isinstance(chunk, WireImageChunk):
                chunk_msg.image.data = chunk.data
                chunk_msg.image.format = chunk.format
                if chunk.expected_tokens is not None:
                    chunk_msg.image.expected_tokens = chunk.expected_tokens
            else:
                chunk_msg.dmel.dmel = chunk.dmel
        for name, array in datum.loss_fn_inputs.items():
            datum_msg.loss_fn_inputs[name].CopyFrom(_tensor_to_proto(array))
        for spans, target in (
            (datum.model_input_spans, datum_msg.model_input_spans),
            (datum.loss_fn_input_spans, datum_msg.loss_fn_input_spans),
        ):
            for span in spans or []:
                span_msg = target.add()
                arm = span_msg.prompt_tokens if span.kind == "prompt" else span_msg.sampled_tokens
                arm.sequence_id = span.sequence_id
                arm.offset = span.offset
                arm.length = span.length
    return msg.SerializeToString()


def _decode_spans(repeated) -> list[WireProvenanceSpan] | None:
    if not repeated:
        return None
    spans = []
    for span_msg in repeated:
        kind = span_msg.WhichOneof("span")
        arm = getattr(span_msg, kind) if kind else span_msg.prompt_tokens
        spans.append(
            WireProvenanceSpan(
                kind="sampled" if kind == "sampled_tokens" else "prompt",
                sequence_id=arm.sequence_id,
                offset=arm.offset,
                length=arm.length,
            )
        )
    return spans


def decode_forward_backward_request(
    body: bytes, content_encoding: str | None = None
) -> ForwardBackwardRequestBody:
    """Parse a posted `ForwardBackwardRequest` (zstd-compressed when `content_encoding` says so).

    Raises UserInputError (field and datum index) for undecodable bytes or inconsistent tensors.
    """
    raw = _maybe_decompress(body, content_encoding)
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(raw)
    except DecodeError as exc:
        raise UserInputError(f"not a tinker_public.ForwardBackwardRequest: {exc}", field="body") from exc

    config: dict[str, float | str] = {key: float(value) for key, value in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        which = value.WhichOneof("value")
        if which == "text":
            config[key] = value.text
        elif which == "number":
            config[key] = value.number

    data = []
    for index, datum_msg in enumerate(msg.data):
        chunks: list[WireChunk] = []
        for chunk_msg in datum_msg.model_input:
            kind = chunk_msg.WhichOneof("chunk")
            if kind == "encoded_text":
                tokens = _frombuffer(
                    chunk_msg.encoded_text.tokens,
                    np.dtype("<i4"),
                    field_name="model_input",
                    datum_index=index,
                )
                chunks.append(WireTextChunk(tokens=tokens.astype(np.int64)))
            elif kind == "image":
                image = chunk_msg.image
                expected = image.expected_tokens if image.HasField("expected_tokens") else None
                chunks.append(WireImageChunk(data=image.data, format=image.format, expected_tokens=expected))
            elif kind == "dmel":
                chunks.append(WireDmelChunk(dmel=chunk_msg.dmel.dmel))
            else:
                raise UserInputError("empty model_input chunk", field="model_input", datum_index=index)
        inputs = {
            name: _tensor_from_proto(
                tensor,
                field_name=f"loss_fn_inputs.{name}",
                datum_index=index,
                sparse_pad=_SPARSE_PAD_DEFAULT,
                dtypes=_REQUEST_DTYPES,
            )
            for name, tensor in sorted(datum_msg.loss_fn_inputs.items())
        }
        data.append(
            WireDatum(
                model_input_chunks=chunks,
                loss_fn_inputs=inputs,
                model_input_spans=_decode_spans(datum_msg.model_input_spans),
                loss_fn_input_spans=_decode_spans(datum_msg.loss_fn_input_spans),
            )
        )
    return ForwardBackwardRequestBody(
        model_id=msg.model_id,
        seq_id=msg.seq_id,
        forward_only=msg.forward_only,
        loss_fn=msg.loss_fn,
        loss_fn_config=config or None,
        data=data,
    )


# ---------------------------------------------------------------- forward_backward output


def _output_dtype(array: np.ndarray) -> tuple[int, str]:
    if np.issubdtype(array.dtype, np.floating):
        return pb.DTYPE_FLOAT32, "<f4"
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return pb.DTYPE_INT64, "<i8"
    raise TypeError(f"cannot encode {array.dtype} in a ForwardBackwardOutput")


def encode_forward_backward_output(
    outputs: Sequence[Mapping[str, np.ndarray]],
    metrics: Mapping[str, float],
    loss_fn_output_type: str = "ArrayRecord",
) -> bytes:
    """Serialize per-datum outputs and metrics as a `ForwardBackwardOutput` (§6.2).

    Datums go into `ArrayRecord`s in order; a new record starts whenever a field's dtype or
    trailing shape changes, since one record holds one trailing shape per field. Every datum must
    carry the same field names, and every metric key must be `name:reduction` (the SDK's chunk
    combiner crashes on anything else).
    """
    for key in metrics:
        if len(key.split(":")) != 2:
            raise ValueError(f"metric key {key!r} must be 'name:reduction' with exactly one colon")
    msg = pb.ForwardBackwardOutput(loss_fn_output_type=loss_fn_output_type)
    for key, value in metrics.items():
        msg.metrics[key] = float(value)

    arrays = [{name: np.asarray(value) for name, value in datum.items()} for datum in outputs]
    if arrays:
        names = list(arrays[0])
        for index, datum in enumerate(arrays):
            if set(datum) != set(names):
                raise ValueError(f"datum {index} has outputs {sorted(datum)}, expected {sorted(names)}")

    def signature(datum: dict[str, np.ndarray]) -> tuple:
        return tuple((name, _output_dtype(datum[name])[0], datum[name].shape[1:]) for name in names)

    start = 0
    while start < len(arrays):
        sig = signature(arrays[start])
        end = start + 1
        while end < len(arrays) and signature(arrays[end]) == sig:
            end += 1
        record = msg.loss_fn_outputs.add(num_datums=end - start)
        for name in names:
            dtype_enum, wire_dtype = _output_dtype(arrays[start][name])
            parts = [
                np.ascontiguousarray(d[name].astype(wire_dtype, copy=False)).tobytes()
                for d in arrays[start:end]
            ]
            offsets = np.cumsum([0] + [len(p) for p in parts], dtype=np.int64)
            batched = record.fields[name]
            batched.data = b"".join(parts)
            batched.offsets = offsets.astype("<i8").tobytes()
            batched.dtype = dtype_enum
            batched.trailing_shape.extend(int(d) for d in arrays[start][name].shape[1:])
        start = end
    return msg.SerializeToString(deterministic=True)


def decode_forward_backward_output(body: bytes) -> ForwardBackwardOutputBody:
    """Parse a `ForwardBackwardOutput` into per-datum arrays (int32 → int64, bf16 → float32)."""
    msg = pb.ForwardBackwardOutput()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise ValueError(f"not a tinker_public.ForwardBackwardOutput: {exc}") from exc
    metrics = {key: float(value) for key, value in msg.metrics.items()}
    outputs: list[dict[str, np.ndarray]] = []
    for record in msg.loss_fn_outputs:
        per_field: dict[str, list[np.ndarray]] = {}
        for name, batched in record.fields.items():
            dtype = _RESULT_DTYPES.get(batched.dtype)
            if dtype is None:
                raise ValueError(f"unsupported dtype enum {batched.dtype} in output {name!r}")
            flat = _widen(np.frombuffer(batched.data, dtype=dtype.newbyteorder("<")), batched.dtype)
            offsets = np.frombuffer(batched.offsets, dtype="<i8") // dtype.itemsize
            trailing = [int(d) for d in batched.trailing_shape]
            per_field[name] = [
                flat[offsets[i] : offsets[i + 1]].reshape([-1, *trailing] if trailing else [-1]).copy()
                for i in range(len(offsets) - 1)
            ]
        count = record.num_datums or (len(next(iter(per_field.values()))) if per_field else 0)
        for i in range(count):
            outputs.append({name: arrays[i] for name, arrays in per_field.items()})
    return ForwardBackwardOutputBody(
        loss_fn_outputs=outputs,
        metrics=metrics,
        loss_fn_output_type=msg.loss_fn_output_type.rsplit(":", 1)[-1] or "ArrayRecord",
    )


# ---------------------------------------------------------------- sample response


def topk_from_rows(rows: Sequence[Sequence[tuple[int, float]] | None], k: int) -> WireTopk:
    """Pack per-position `(token_id, logprob)` lists (None = not computed) into padded matrices."""
    token_ids = np.zeros((len(rows), k), dtype=np.int32)
    logprobs = np.full((len(rows), k), TOPK_MASK_LOGPROB, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (token_id, logprob) in enumerate((row or [])[:k]):
            token_ids[i, j] = token_id
            logprobs[i, j] = logprob
    return WireTopk(token_ids=token_ids, logprobs=logprobs)


def topk_to_rows(topk: WireTopk) -> list[list[tuple[int, float]] | None]:
    """Inverse of `topk_from_rows`: trailing empty cells dropped, an all-empty row is None."""
    rows: list[list[tuple[int, float]] | None] = []
    for ids, lps in zip(topk.token_ids.tolist(), topk.logprobs.tolist(), strict=True):
        cells = [(int(t), float(lp)) for t, lp in zip(ids, lps, strict=True)]
        while cells and cells[-1] == (0, TOPK_MASK_LOGPROB):
            cells.pop()
        rows.append(cells if cells and ids and not (ids[0] == 0 and lps[0] == TOPK_MASK_LOGPROB) else None)
    return rows


def _topk_to_proto(topk: WireTopk, target) -> None:
    ids = np.asarray(topk.token_ids, dtype="<i4")
    lps = np.asarray(topk.logprobs, dtype="<f4")
    if ids.shape != lps.shape or ids.ndim != 2:
        raise ValueError(f"top-k matrices must both be (length, k), got {ids.shape} and {lps.shape}")
    target.token_ids = np.ascontiguousarray(ids).tobytes()
    target.logprobs = np.ascontiguousarray(lps).tobytes()
    target.length, target.k = ids.shape


def _topk_from_proto(msg) -> WireTopk | None:
    if msg.length == 0 or msg.k == 0:
        return None
    shape = (msg.length, msg.k)
    return WireTopk(
        token_ids=np.frombuffer(msg.token_ids, dtype="<i4").reshape(shape).astype(np.int64),
        logprobs=np.frombuffer(msg.logprobs, dtype="<f4").reshape(shape).copy(),
    )


def _nan_for_none(values: Sequence[float | None] | np.ndarray) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values.astype("<f4")
    return np.array([math.nan if v is None else v for v in values], dtype="<f4")


def encode_sample_response(body: SampleResponseBody) -> bytes:
    """Serialize a `SampleResponse` (§5.6, §6.3): int32 tokens, float32 logprobs, NaN for None."""
    msg = pb.SampleResponse(prompt_cache_hit_tokens=body.prompt_cache_hit_tokens)
    for sequence in body.sequences:
        seq_msg = msg.sequences.add()
        if sequence.stop_reason not in ("stop", "length"):
            raise ValueError(f"stop_reason must be 'stop' or 'length', got {sequence.stop_reason!r}")
        seq_msg.stop_reason = (
            pb.STOP_REASON_LENGTH if sequence.stop_reason == "length" else pb.STOP_REASON_STOP
        )
        seq_msg.tokens = np.asarray(sequence.tokens, dtype="<i4").tobytes()
        if sequence.logprobs is not None:
            if len(sequence.logprobs) != len(sequence.tokens):
                raise ValueError("a sequence needs one logprob per token")
            seq_msg.logprobs = _nan_for_none(sequence.logprobs).tobytes()
        if sequence.topk_logprobs is not None:
            _topk_to_proto(sequence.topk_logprobs, seq_msg.topk_sampled_logprobs)
    if body.prompt_logprobs is not None:
        msg.prompt_logprobs = _nan_for_none(body.prompt_logprobs).tobytes()
    if body.topk_prompt_logprobs is not None:
        _topk_to_proto(body.topk_prompt_logprobs, msg.topk_prompt_logprobs)
    if body.target_prompt_logprobs is not None:
        msg.target_prompt_logprobs.CopyFrom(
            _tensor_to_proto(np.asarray(body.target_prompt_logprobs, dtype=np.float32))
        )
    if body.prompt_alt_tokens is not None:
        tokens, logprobs = body.prompt_alt_tokens
        msg.prompt_alt_tokens.tokens.CopyFrom(_tensor_to_proto(np.asarray(tokens, dtype=np.int64)))
        msg.prompt_alt_tokens.logprobs.CopyFrom(_tensor_to_proto(np.asarray(logprobs, dtype=np.float32)))
    return msg.SerializeToString(deterministic=True)


def decode_sample_response(body: bytes) -> SampleResponseBody:
    """Parse a `SampleResponse`; NaN prompt logprobs become None, as the SDK presents them."""
    msg = pb.SampleResponse()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise ValueError(f"not a tinker_public.SampleResponse: {exc}") from exc
    sequences = []
    for seq_msg in msg.sequences:
        if seq_msg.stop_reason not in (pb.STOP_REASON_STOP, pb.STOP_REASON_LENGTH):
            raise ValueError(f"unknown stop_reason enum {seq_msg.stop_reason}")
        sequences.append(
            WireSampledSequence(
                tokens=np.frombuffer(seq_msg.tokens, dtype="<i4").astype(np.int64).tolist(),
                logprobs=np.frombuffer(seq_msg.logprobs, dtype="<f4").tolist() if seq_msg.logprobs else None,
                stop_reason="length" if seq_msg.stop_reason == pb.STOP_REASON_LENGTH else "stop",
                topk_logprobs=_topk_from_proto(seq_msg.topk_sampled_logprobs)
                if seq_msg.HasField("topk_sampled_logprobs")
                else None,
            )
        )
    prompt_logprobs = None
    if msg.prompt_logprobs:
        prompt_logprobs = [
            None if math.isnan(v) else v for v in np.frombuffer(msg.prompt_logprobs, dtype="<f4").tolist()
        ]

    def tensor(t) -> np.ndarray:
        return _tensor_from_proto(
            t, field_name="response", datum_index=None, sparse_pad=0.0, dtypes=_RESULT_DTYPES
        )

    return SampleResponseBody(
        sequences=sequences,
        prompt_logprobs=prompt_logprobs,
        topk_prompt_logprobs=_topk_from_proto(msg.topk_prompt_logprobs)
        if msg.HasField("topk_prompt_logprobs")
        else None,
        prompt_cache_hit_tokens=msg.prompt_cache_hit_tokens,
        target_prompt_logprobs=tensor(msg.target_prompt_logprobs)
        if msg.HasField("target_prompt_logprobs")
        else None,
        prompt_alt_tokens=(tensor(msg.prompt_alt_tokens.tokens), tensor(msg.prompt_alt_tokens.logprobs))
        if msg.HasField("prompt_alt_tokens")
        else None,
    )
