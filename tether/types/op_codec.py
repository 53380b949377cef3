"""The byte encoding of trainer ops and results across a process boundary (never pickle).

A frame is `length (u32, big-endian) | op_id (u64, big-endian) | body`, where `length` counts the
op id and the body. The body is msgpack of the envelope's fields; numpy arrays travel as a msgpack
extension (type 1) holding `dtype, shape` and the array's raw little-endian bytes, so tensors cross
bit-exactly and without a text round trip. Decoding validates the body against the op and result
types of `tether.types.ops`; a malformed body raises `OpDecodeError` carrying the frame's op id, so
the receiver fails that one op and keeps serving.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
from pydantic import TypeAdapter, ValidationError

from tether.types.ops import OpEnvelope, OpResult, ResultEnvelope

_ARRAY_EXT = 1
_HEADER = struct.Struct(">IQ")
HEADER_SIZE = _HEADER.size
MAX_FRAME_BYTES = 1 << 31
"""Frames above 2 GiB are refused (a damaged length prefix must not size an allocation); the SDK
sends bodies of a few MB, and sampler weights never cross as frames (they are files)."""
_ALLOWED_DTYPES = frozenset(
    {"|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"}
)


class OpDecodeError(ValueError):
    """A frame's body is not a valid envelope; `op_id` names the op to fail."""

    def __init__(self, op_id: int, message: str) -> None:
        super().__init__(message)
        self.op_id = op_id


def _default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not np.little_endian):
            array = array.astype(array.dtype.newbyteorder("<"))
        header = msgpack.packb([array.dtype.str, list(array.shape)])
        return msgpack.ExtType(_ARRAY_EXT, struct.pack(">H", len(header)) + header + array.tobytes())
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__} in an op")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _ARRAY_EXT:
        raise ValueError(f"unknown msgpack extension {code}")
    (header_len,) = struct.unpack_from(">H", data)
    dtype_str, shape = msgpack.unpackb(data[2 : 2 + header_len])
    if dtype_str not in _ALLOWED_DTYPES:
        raise ValueError(f"array dtype {dtype_str!r} is not allowed")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"array shape {shape!r} is not a list of non-negative integers")
    dtype = np.dtype(dtype_str)
    raw = data[2 + header_len :]
    count = 1
    for dim in shape:
        count *= dim
    if count * dtype.itemsize != len(raw):
        raise ValueError(
            f"array of shape {shape} and dtype {dtype_str} needs {count * dtype.itemsize} bytes, got {len(raw)}"
        )
    return np.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


def _frame(op_id: int, body: dict[str, Any]) -> bytes:
    payload = msgpack.packb(body, default=_default, use_bin_type=True)
    return _HEADER.pack(len(payload) + 8, op_id) + payload


def encode_op(envelope: OpEnvelope) -> bytes:
    """One frame carrying an op."""
    return _frame(envelope.op_id, envelope.model_dump(mode="python"))


def encode_result(envelope: ResultEnvelope) -> bytes:
    """One frame carrying an op's result."""
    return _frame(envelope.op_id, envelope.model_dump(mode="python"))


def read_header(header: bytes) -> tuple[int, int]:
    """(body length in bytes, op id) of a frame's first `HEADER_SIZE` bytes."""
    length, op_id = _HEADER.unpack(header)
    if length < 8 or length > MAX_FRAME_BYTES:
        raise ValueError(f"frame length {length} is out of range")
    return length - 8, op_id


def _unpack(op_id: int, body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, ext_hook=_ext_hook, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - any malformed body is this op's failure
        raise OpDecodeError(op_id, f"malformed op encoding: {exc}") from None


_RESULT_ADAPTER: TypeAdapter[Any] = TypeAdapter(OpResult)


def decode_op(op_id: int, body: bytes) -> OpEnvelope:
    """The envelope in a frame body; `OpDecodeError` if it is not a valid op (or its id disagrees)."""
    data = _unpack(op_id, body)
    try:
        envelope = OpEnvelope.model_validate(data)
    except ValidationError as exc:
        raise OpDecodeError(op_id, f"malformed op: {exc.errors(include_url=False)[:3]}") from None
    if envelope.op_id != op_id:
        raise OpDecodeError(op_id, f"frame op id {op_id} disagrees with the envelope's {envelope.op_id}")
    return envelope


def decode_result(op_id: int, body: bytes) -> ResultEnvelope:
    """The result envelope in a frame body; `OpDecodeError` if it is malformed."""
    data = _unpack(op_id, body)
    try:
        return ResultEnvelope.model_validate(data)
    except ValidationError as exc:
        raise OpDecodeError(op_id, f"malformed result: {exc.errors(include_url=False)[:3]}") from None
