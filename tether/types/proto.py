"""Codecs between the `tinker_public` protobuf wire format and plain dataclasses of numpy arrays.

Three messages travel as protobuf (tinker-protocol.md §6): the `ForwardBackwardRequest` the SDK
posts, and the `ForwardBackwardOutput` / `SampleResponse` results the server returns. The server
decodes requests with `decode_forward_backward_request` and encodes results with
`encode_forward_backward_output` and `encode_sample_response`; tether's own SDK uses the mirror
functions. Everything here is torch-free: tensors are numpy arrays (float32 / int64).

This module is the import surface; the schema is `proto_schema`, the shared tensor pieces
`proto_tensors`, and the codecs `proto_training` and `proto_sampling`.
"""

from __future__ import annotations

from tether.types.proto_sampling import (
    TOPK_MASK_LOGPROB,
    SampleResponseBody,
    StopReason,
    WireSampledSequence,
    WireTopk,
    decode_sample_response,
    encode_sample_response,
    topk_from_rows,
    topk_to_rows,
)
from tether.types.proto_tensors import MAX_DECOMPRESSED_BYTES, MAX_DENSE_BYTES, MAX_DENSE_ELEMENTS
from tether.types.proto_training import (
    ForwardBackwardOutputBody,
    ForwardBackwardRequestBody,
    WireChunk,
    WireDatum,
    WireDmelChunk,
    WireImageChunk,
    WireProvenanceSpan,
    WireTextChunk,
    decode_forward_backward_output,
    decode_forward_backward_request,
    encode_forward_backward_output,
    encode_forward_backward_request,
)

__all__ = [
    "TOPK_MASK_LOGPROB",
    "MAX_DECOMPRESSED_BYTES",
    "MAX_DENSE_BYTES",
    "MAX_DENSE_ELEMENTS",
    "StopReason",
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
]
