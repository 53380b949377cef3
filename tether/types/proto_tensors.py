"""Shared pieces of the protobuf codecs: body decompression and numpy <-> `tinker_public.Tensor`.

Decoding validates what the bytes claim (dtype, byte length against shape, CSR indices, sizes) and
raises `UserInputError` naming the field and datum, because request bodies are caller input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import zstandard

from tether.types import proto_schema as pb
from tether.types.errors import UserInputError
from tether.types.wire_base import MAX_DENSE_BYTES, MAX_DENSE_ELEMENTS

__all__ = [
    "MAX_DECOMPRESSED_BYTES",
    "MAX_DENSE_BYTES",
    "MAX_DENSE_ELEMENTS",
    "DenseBudget",
    "REQUEST_DTYPES",
    "RESULT_DTYPES",
    "decompress_body",
    "tensor_to_proto",
    "tensor_from_proto",
    "frombuffer",
    "widen",
]

MAX_DECOMPRESSED_BYTES = 256 << 20
"""A zstd body may not expand past this (256 MiB) unless the caller allows more; the server passes
its configured `max_decoded_body_bytes`."""


class DenseBudget:
    """How many more bytes the sparse tensors of one request may densify to."""

    def __init__(self, max_bytes: int = MAX_DENSE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.left = max_bytes

    def take(self, nbytes: int, *, field_name: str, datum_index: int | None) -> None:
        if nbytes > self.left:
            raise UserInputError(
                f"sparse tensors of this request would densify to more than {self.max_bytes} bytes "
                "(exceeds the limit)",
                field=field_name,
                datum_index=datum_index,
            )
        self.left -= nbytes


REQUEST_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype(np.float32),
    pb.DTYPE_INT64: np.dtype(np.int64),
}
# Results may also carry int32 and bfloat16 (§6.2); both widen on decode like the SDK does.
RESULT_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype(np.float32),
    pb.DTYPE_INT64: np.dtype(np.int64),
    pb.DTYPE_INT32: np.dtype(np.int32),
    pb.DTYPE_BFLOAT16: np.dtype(np.uint16),
}


def decompress_body(
    body: bytes, content_encoding: str | None, *, max_bytes: int = MAX_DECOMPRESSED_BYTES
) -> bytes:
    """The body without its Content-Encoding (identity or zstd), streamed with a running total so no
    more than `max_bytes` is ever produced (a frame's declared size is not trusted)."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "zstd":
        raise UserInputError(f"unsupported Content-Encoding {content_encoding!r}", field="content-encoding")
    chunks: list[bytes] = []
    total = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True) as reader:
            while chunk := reader.read(1 << 20):
                total += len(chunk)
                if total > max_bytes:
                    raise UserInputError(f"decompressed body exceeds {max_bytes} bytes", field="body")
                chunks.append(chunk)
    except zstandard.ZstdError as exc:
        raise UserInputError(f"invalid zstd body: {exc}", field="body") from exc
    return b"".join(chunks)


def frombuffer(raw: bytes, dtype: np.dtype, *, field_name: str, datum_index: int | None) -> np.ndarray:
    if len(raw) % dtype.itemsize:
        raise UserInputError(
            f"{len(raw)} bytes is not a whole number of {dtype.name} values",
            field=field_name,
            datum_index=datum_index,
        )
    return np.frombuffer(raw, dtype=dtype).copy()


def tensor_to_proto(array: np.ndarray):
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


def tensor_from_proto(
    msg,
    *,
    field_name: str,
    datum_index: int | None,
    sparse_pad: float,
    dtypes: Mapping[int, np.dtype],
    budget: DenseBudget | None = None,
) -> np.ndarray:
    """A dense numpy array from a proto Tensor; sparse CSR cells not listed take `sparse_pad`.

    A sparse tensor's dense size is charged to `budget` (one per request) before anything is allocated.
    """
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
        values = widen(
            frombuffer(msg.sparse_csr.values, dtype, field_name=field_name, datum_index=datum_index),
            msg.dtype,
        )
        crow = frombuffer(
            msg.sparse_csr.crow_indices, np.dtype("<i8"), field_name=field_name, datum_index=datum_index
        )
        col = frombuffer(
            msg.sparse_csr.col_indices, np.dtype("<i8"), field_name=field_name, datum_index=datum_index
        )
        return _csr_to_dense(
            values,
            crow,
            col,
            shape,
            sparse_pad,
            field_name=field_name,
            datum_index=datum_index,
            budget=budget or DenseBudget(),
        )
    values = widen(frombuffer(msg.dense, dtype, field_name=field_name, datum_index=datum_index), msg.dtype)
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


def widen(values: np.ndarray, dtype_enum: int) -> np.ndarray:
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
    budget: DenseBudget,
) -> np.ndarray:
    def bad(why: str) -> UserInputError:
        return UserInputError(f"invalid sparse CSR tensor: {why}", field=field_name, datum_index=datum_index)

    if len(shape) != 2:
        raise bad(f"shape must be 2-D, got {shape}")
    rows, cols = shape
    # Python ints: no overflow, and nothing is allocated before the check.
    budget.take(rows * cols * values.dtype.itemsize, field_name=field_name, datum_index=datum_index)
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
