"""Codecs of the training messages: the `ForwardBackwardRequest` the SDK posts and the
`ForwardBackwardOutput` the server returns (tinker-protocol.md §6.1, §6.2), on plain dataclasses of
numpy arrays. Sparse CSR inputs are densified here, so nothing downstream sees the sparse layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from google.protobuf.message import DecodeError

from tether.types import proto_schema as pb
from tether.types.errors import UserInputError
from tether.types.proto_tensors import (
    MAX_DECOMPRESSED_BYTES,
    MAX_DENSE_BYTES,
    REQUEST_DTYPES,
    RESULT_DTYPES,
    DenseBudget,
    decompress_body,
    frombuffer,
    tensor_from_proto,
    tensor_to_proto,
    widen,
)

# Pad value of cells a sparse CSR loss input does not list (§5.2).
_SPARSE_PAD_DEFAULT = 0.0


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
            datum_msg.loss_fn_inputs[name].CopyFrom(tensor_to_proto(array))
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
    body: bytes,
    content_encoding: str | None = None,
    *,
    max_decompressed_bytes: int = MAX_DECOMPRESSED_BYTES,
    max_dense_bytes: int = MAX_DENSE_BYTES,
) -> ForwardBackwardRequestBody:
    """Parse a posted `ForwardBackwardRequest` (zstd-compressed when `content_encoding` says so).

    A compressed body may expand to at most `max_decompressed_bytes`, and the request's sparse
    tensors may densify to at most `max_dense_bytes` in all; both are checked before allocating.
    Raises UserInputError (field and datum index) for undecodable bytes or inconsistent tensors.
    """
    raw = decompress_body(body, content_encoding, max_bytes=max_decompressed_bytes)
    budget = DenseBudget(max_dense_bytes)
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
                tokens = frombuffer(
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
            name: tensor_from_proto(
                tensor,
                field_name=f"loss_fn_inputs.{name}",
                datum_index=index,
                sparse_pad=_SPARSE_PAD_DEFAULT,
                dtypes=REQUEST_DTYPES,
                budget=budget,
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
            dtype = RESULT_DTYPES.get(batched.dtype)
            if dtype is None:
                raise ValueError(f"unsupported dtype enum {batched.dtype} in output {name!r}")
            flat = widen(np.frombuffer(batched.data, dtype=dtype.newbyteorder("<")), batched.dtype)
            offsets = np.frombuffer(batched.offsets, dtype="<i8") // dtype.itemsize
            trailing = [int(d) for d in batched.trailing_shape]
            per_field[name] = [
                flat[offsets[i] : offsets[i + 1]].reshape([-1, *trailing] if trailing else [-1]).copy()
                for i in range(len(offsets) - 1)
            ]
        count = record.num_datums or (len(next(iter(per_field.values()))) if per_field else 0)
        short = [name for name, arrays in per_field.items() if len(arrays) != count]
        if short:
            raise ValueError(f"outputs {short} do not cover the record's {count} datums")
        for i in range(count):
            outputs.append({name: arrays[i] for name, arrays in per_field.items()})
    return ForwardBackwardOutputBody(
        loss_fn_outputs=outputs,
        metrics=metrics,
        loss_fn_output_type=msg.loss_fn_output_type.rsplit(":", 1)[-1] or "ArrayRecord",
    )
