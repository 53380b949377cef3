"""Golden bytes and cross-checks with the official `tinker` SDK for tether's protobuf codecs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zstandard
from google.protobuf import descriptor_pb2
from tinker import types as tt
from tinker.proto import request_conv, response_conv
from tinker.proto import tinker_public_pb2 as sdk_pb

from tether.types import proto_schema
from tether.types.errors import UserInputError
from tether.types.proto import (
    TOPK_MASK_LOGPROB,
    ForwardBackwardRequestBody,
    SampleResponseBody,
    WireDatum,
    WireProvenanceSpan,
    WireSampledSequence,
    WireTextChunk,
    decode_forward_backward_output,
    decode_forward_backward_request,
    decode_sample_response,
    encode_forward_backward_output,
    encode_forward_backward_request,
    encode_sample_response,
    topk_from_rows,
    topk_to_rows,
)

# tinker-protocol.md §6.1, §6.2, §6.3
GOLDEN_REQUEST = bytes.fromhex(
    "0a10736573732d6162633a747261696e3a3010011a640a100a0e0a0c010000000200000003000000121e0a0777656967"
    "68747312130a0c000000000000803f0000803f180122010312300a0d7461726765745f746f6b656e73121f0a18020000"
    "0000000000030000000000000004000000000000001802220103220d63726f73735f656e74726f7079"
)
GOLDEN_OUTPUT = bytes.fromhex(
    "0a0b41727261795265636f72641242123e0a086c6f6770726f627312320a14000080bf000000c0000040c0000000bf0000"
    "80be121800000000000000000c000000000000001400000000000000180118021a130a086c6f73733a73756d1100000000"
    "00001b40"
)
GOLDEN_SAMPLE = bytes.fromhex("0a1412080b0000000c0000001a08cdccccbdcdcc4cbe120c0000c07f000080bf000000c0")


def _fields(file: descriptor_pb2.FileDescriptorProto) -> dict:
    out = {}
    for msg in file.message_type:
        for f in msg.field:
            oneof = msg.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None
            out[(msg.name, f.name)] = (f.number, f.type, f.label, f.type_name, f.proto3_optional, oneof)
        for nested in msg.nested_type:
            for f in nested.field:
                out[(msg.name, nested.name, f.name)] = (f.number, f.type, f.type_name)
    for enum in file.enum_type:
        out[(enum.name,)] = [(v.name, v.number) for v in enum.value]
    return out


def test_schema_matches_official_sdk_descriptor():
    theirs = descriptor_pb2.FileDescriptorProto()
    sdk_pb.DESCRIPTOR.CopyToProto(theirs)
    assert _fields(proto_schema.build_file_descriptor()) == _fields(theirs)


def _golden_request_body() -> ForwardBackwardRequestBody:
    datum = WireDatum(
        model_input_chunks=[WireTextChunk(np.array([1, 2, 3]))],
        loss_fn_inputs={"weights": np.array([0, 1, 1], np.float32), "target_tokens": np.array([2, 3, 4])},
    )
    return ForwardBackwardRequestBody("sess-abc:train:0", 1, False, "cross_entropy", None, [datum])


def test_request_golden_bytes_both_ways():
    # Map entry order is not fixed by protobuf (the SDK's own encoder varies), so compare messages.
    encoded = encode_forward_backward_request(_golden_request_body())
    assert len(encoded) == len(GOLDEN_REQUEST)
    assert sdk_pb.ForwardBackwardRequest.FromString(encoded) == sdk_pb.ForwardBackwardRequest.FromString(
        GOLDEN_REQUEST
    )
    body = decode_forward_backward_request(GOLDEN_REQUEST)
    assert (body.model_id, body.seq_id, body.loss_fn, body.forward_only) == (
        "sess-abc:train:0",
        1,
        "cross_entropy",
        False,
    )
    assert body.loss_fn_config is None
    (datum,) = body.data
    np.testing.assert_array_equal(datum.input_tokens(), [1, 2, 3])
    assert datum.loss_fn_inputs["target_tokens"].dtype == np.int64
    np.testing.assert_array_equal(datum.loss_fn_inputs["target_tokens"], [2, 3, 4])
    assert datum.loss_fn_inputs["weights"].dtype == np.float32
    np.testing.assert_array_equal(datum.loss_fn_inputs["weights"], [0, 1, 1])


def _sdk_request_bytes(data, loss_fn="ppo", config=None, forward_only=True, seq_id=7) -> bytes:
    request = tt.ForwardBackwardRequest(
        forward_backward_input=tt.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id="s:train:3",
        seq_id=seq_id,
    )
    msg = request_conv.forward_backward_request_to_proto(request)
    msg.forward_only = forward_only  # the SDK's resource layer sets this after conversion
    return msg.SerializeToString()


def test_decodes_sdk_request_with_config_2d_sparse_and_spans():
    dense_2d = torch.tensor([[5, 0, 0], [0, 0, 7]], dtype=torch.int64)
    datum = tt.Datum(
        model_input=tt.ModelInput.from_ints([10, 11, 12]).append(tt.EncodedTextChunk(tokens=[13])),
        loss_fn_inputs={
            "target_tokens": tt.TensorData.from_torch_sparse(dense_2d),
            "logprobs": [-0.5, -1.0],
            "advantages": tt.TensorData.from_numpy(np.array([1.5, -2.0], np.float32)),
        },
    ).with_provenance(
        model_input=[tt.PromptProvenanceSpan(sequence_id="q0", offset=0, length=4)],
        loss_fn_inputs=[tt.SampledProvenanceSpan(sequence_id="q1", offset=1, length=2)],
    )
    config = {"clip_low_threshold": 0.7, "kind": "abc"}
    body = decode_forward_backward_request(_sdk_request_bytes([datum, datum], config=config))
    assert (body.model_id, body.seq_id, body.forward_only, body.loss_fn) == ("s:train:3", 7, True, "ppo")
    assert body.loss_fn_config == {"clip_low_threshold": pytest.approx(0.7), "kind": "abc"}
    assert len(body.data) == 2
    got = body.data[1]
    np.testing.assert_array_equal(got.input_tokens(), [10, 11, 12, 13])
    np.testing.assert_array_equal(got.loss_fn_inputs["target_tokens"], dense_2d.numpy())
    np.testing.assert_allclose(got.loss_fn_inputs["advantages"], [1.5, -2.0])
    np.testing.assert_allclose(got.loss_fn_inputs["logprobs"], [-0.5, -1.0])
    assert got.model_input_spans == [WireProvenanceSpan("prompt", "q0", 0, 4)]
    assert got.loss_fn_input_spans == [WireProvenanceSpan("sampled", "q1", 1, 2)]


def test_zstd_request_decodes_and_garbage_is_a_user_error():
    compressed = zstandard.ZstdCompressor().compress(GOLDEN_REQUEST)
    assert decode_forward_backward_request(compressed, content_encoding="zstd").model_id == "sess-abc:train:0"
    with pytest.raises(UserInputError) as err:
        decode_forward_backward_request(b"\x00\x01garbage", content_encoding="zstd")
    assert err.value.field == "body"
    with pytest.raises(UserInputError):
        decode_forward_backward_request(b"\xff\xff\xff")
    with pytest.raises(UserInputError) as err:
        decode_forward_backward_request(GOLDEN_REQUEST, content_encoding="br")
    assert err.value.field == "content-encoding"


def _mutated_request(mutate) -> bytes:
    msg = sdk_pb.ForwardBackwardRequest()
    msg.ParseFromString(GOLDEN_REQUEST)
    second = msg.data.add()
    second.CopyFrom(msg.data[0])
    mutate(second)
    return msg.SerializeToString()


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: setattr(d.loss_fn_inputs["weights"], "dense", b"\x00" * 8), "loss_fn_inputs.weights"),
        (
            lambda d: setattr(d.loss_fn_inputs["weights"], "dtype", sdk_pb.DTYPE_BFLOAT16),
            "loss_fn_inputs.weights",
        ),
        (lambda d: setattr(d.loss_fn_inputs["weights"], "dense", b"\x00" * 7), "loss_fn_inputs.weights"),
        (lambda d: setattr(d.model_input[0].encoded_text, "tokens", b"\x01\x00\x00"), "model_input"),
    ],
)
def test_inconsistent_tensor_names_field_and_datum(mutate, field):
    with pytest.raises(UserInputError) as err:
        decode_forward_backward_request(_mutated_request(mutate))
    assert err.value.field == field
    assert err.value.datum_index == 1


def test_bad_sparse_csr_is_a_user_error():
    def mutate(d):
        t = d.loss_fn_inputs["target_tokens"]
        t.Clear()
        t.dtype = sdk_pb.DTYPE_INT64
        t.shape.extend([2, 2])
        t.sparse_csr.values = np.array([1], "<i8").tobytes()
        t.sparse_csr.crow_indices = np.array([0, 1, 1], "<i8").tobytes()
        t.sparse_csr.col_indices = np.array([5], "<i8").tobytes()

    with pytest.raises(UserInputError, match="column index"):
        decode_forward_backward_request(_mutated_request(mutate))


def test_output_golden_bytes_and_sdk_decoding():
    outputs = [
        {"logprobs": np.array([-1, -2, -3], np.float32)},
        {"logprobs": np.array([-0.5, -0.25], np.float32)},
    ]
    encoded = encode_forward_backward_output(outputs, {"loss:sum": 6.75})
    assert encoded == GOLDEN_OUTPUT
    ours = decode_forward_backward_output(GOLDEN_OUTPUT)
    assert ours.metrics == {"loss:sum": 6.75} and ours.loss_fn_output_type == "ArrayRecord"
    np.testing.assert_array_equal(ours.loss_fn_outputs[1]["logprobs"], [-0.5, -0.25])
    sdk = response_conv.deserialize_forward_backward_output(encoded)
    assert [d["logprobs"].tolist() for d in sdk.loss_fn_outputs] == [[-1, -2, -3], [-0.5, -0.25]]


def test_output_ragged_trailing_shapes_split_records_and_keep_order():
    outputs = [
        {"logprobs": np.arange(6, dtype=np.float32).reshape(3, 2), "ids": np.arange(3)},
        {"logprobs": np.arange(4, dtype=np.float32).reshape(1, 4), "ids": np.arange(1)},
        {"logprobs": np.arange(2, dtype=np.float32).reshape(1, 2), "ids": np.arange(1)},
    ]
    encoded = encode_forward_backward_output(outputs, {"loss:sum": 1.0, "n:mean": 2.0})
    sdk = response_conv.deserialize_forward_backward_output(encoded)
    ours = decode_forward_backward_output(encoded)
    for index, expected in enumerate(outputs):
        assert sdk.loss_fn_outputs[index]["logprobs"].shape == list(expected["logprobs"].shape)
        np.testing.assert_array_equal(sdk.loss_fn_outputs[index]["logprobs"].to_numpy(), expected["logprobs"])
        np.testing.assert_array_equal(ours.loss_fn_outputs[index]["logprobs"], expected["logprobs"])
        assert ours.loss_fn_outputs[index]["ids"].dtype == np.int64
    assert ours.metrics == {"loss:sum": 1.0, "n:mean": 2.0}


def test_output_rejects_bad_metric_keys_and_decodes_empty():
    with pytest.raises(ValueError):
        encode_forward_backward_output([], {"loss": 1.0})
    with pytest.raises(ValueError):
        encode_forward_backward_output([], {"a:b:c": 1.0})
    empty = decode_forward_backward_output(encode_forward_backward_output([], {"loss:sum": 0.0}))
    assert empty.loss_fn_outputs == [] and empty.loss_fn_output_type == "ArrayRecord"


def test_output_decodes_int32_and_bfloat16_like_the_sdk():
    msg = sdk_pb.ForwardBackwardOutput(loss_fn_output_type="x:ArrayRecord")
    record = msg.loss_fn_outputs.add(num_datums=1)
    values = np.array([1.5, -2.0], np.float32)
    record.fields["lp"].data = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    record.fields["lp"].offsets = np.array([0, 4], "<i8").tobytes()
    record.fields["lp"].dtype = sdk_pb.DTYPE_BFLOAT16
    record.fields["tok"].data = np.array([3, 4], "<i4").tobytes()
    record.fields["tok"].offsets = np.array([0, 8], "<i8").tobytes()
    record.fields["tok"].dtype = sdk_pb.DTYPE_INT32
    ours = decode_forward_backward_output(msg.SerializeToString())
    assert ours.loss_fn_output_type == "ArrayRecord"
    np.testing.assert_array_equal(ours.loss_fn_outputs[0]["lp"], values)
    assert ours.loss_fn_outputs[0]["tok"].dtype == np.int64


def test_sample_golden_bytes_and_sdk_decoding():
    body = SampleResponseBody(
        sequences=[WireSampledSequence(tokens=[11, 12], logprobs=[-0.1, -0.2], stop_reason="stop")],
        prompt_logprobs=[None, -1.0, -2.0],
    )
    assert encode_sample_response(body) == GOLDEN_SAMPLE
    sdk = response_conv.deserialize_sample_response(GOLDEN_SAMPLE)
    assert sdk.sequences[0].tokens == [11, 12] and sdk.sequences[0].stop_reason == "stop"
    assert sdk.prompt_logprobs == [None, -1.0, -2.0]
    ours = decode_sample_response(GOLDEN_SAMPLE)
    assert ours.prompt_logprobs == [None, -1.0, -2.0]
    assert ours.sequences[0].tokens == [11, 12]
    assert ours.sequences[0].logprobs == pytest.approx([-0.1, -0.2])


def test_sample_topk_target_and_alt_tokens_round_trip_through_sdk():
    topk_rows = [None, [(5, -0.1), (6, -2.5)], [(7, -0.3)]]
    body = SampleResponseBody(
        sequences=[
            WireSampledSequence(
                tokens=[1, 2],
                logprobs=None,
                stop_reason="length",
                topk_logprobs=topk_from_rows([[(1, -0.5)], [(2, -0.7)]], 2),
            ),
            WireSampledSequence(tokens=[], logprobs=[], stop_reason="stop"),
        ],
        prompt_logprobs=[None, -1.0, -2.0],
        topk_prompt_logprobs=topk_from_rows(topk_rows, 2),
        prompt_cache_hit_tokens=3,
        target_prompt_logprobs=np.array([[-1.0, 0.0], [-2.0, -3.0]], np.float32),
        prompt_alt_tokens=(np.array([[4], [5]]), np.array([[-0.5], [-0.6]], np.float32)),
    )
    encoded = encode_sample_response(body)
    sdk = response_conv.deserialize_sample_response(encoded)
    assert sdk.sequences[0].stop_reason == "length" and sdk.sequences[0].logprobs is None
    assert sdk.sequences[0].topk_logprobs == [[(1, pytest.approx(-0.5))], [(2, pytest.approx(-0.7))]]
    assert sdk.topk_prompt_logprobs[0] is None
    assert sdk.topk_prompt_logprobs[2] == [(7, pytest.approx(-0.3))]
    assert sdk.prompt_cache_hit_tokens == 3
    np.testing.assert_array_equal(sdk.target_prompt_logprobs.to_numpy(), body.target_prompt_logprobs)
    assert sdk.prompt_alt_tokens.tokens.tolist() == [[4], [5]]
    ours = decode_sample_response(encoded)
    assert topk_to_rows(ours.topk_prompt_logprobs)[1] == [(5, pytest.approx(-0.1)), (6, pytest.approx(-2.5))]
    assert topk_to_rows(ours.topk_prompt_logprobs)[0] is None
    assert ours.sequences[1].tokens == [] and ours.sequences[1].stop_reason == "stop"
    np.testing.assert_array_equal(ours.prompt_alt_tokens[0], [[4], [5]])
    assert ours.prompt_cache_hit_tokens == 3
    assert ours.topk_prompt_logprobs.logprobs[0, 0] == TOPK_MASK_LOGPROB


def test_sample_rejects_mismatched_logprobs():
    with pytest.raises(ValueError):
        encode_sample_response(SampleResponseBody(sequences=[WireSampledSequence([1, 2], [0.0], "stop")]))
    assert math.isnan(
        np.frombuffer(encode_sample_response(SampleResponseBody([], prompt_logprobs=[None]))[2:], "<f4")[0]
    )


def test_our_request_encoding_equals_the_sdk_encoding():
    from tether.types.proto import WireImageChunk

    sdk_datum = tt.Datum(
        model_input=tt.ModelInput.from_ints([10, 11]).append(
            tt.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4)
        ),
        loss_fn_inputs={"target_tokens": [1, 2, 3, 4, 5, 6], "advantages": [0.5] * 6},
    ).with_provenance(
        model_input=[tt.PromptProvenanceSpan(sequence_id="p", length=6)],
        loss_fn_inputs=[tt.SampledProvenanceSpan(sequence_id="s", offset=2, length=6)],
    )
    ours = ForwardBackwardRequestBody(
        model_id="s:train:3",
        seq_id=7,
        forward_only=True,
        loss_fn="ppo",
        loss_fn_config={"clip_low_threshold": 0.7, "kind": "abc"},
        data=[
            WireDatum(
                model_input_chunks=[WireTextChunk(np.array([10, 11])), WireImageChunk(b"\x89PNG", "png", 4)],
                loss_fn_inputs={"target_tokens": np.arange(1, 7), "advantages": np.full(6, 0.5, np.float32)},
                model_input_spans=[WireProvenanceSpan("prompt", "p", 0, 6)],
                loss_fn_input_spans=[WireProvenanceSpan("sampled", "s", 2, 6)],
            )
        ],
    )
    sdk_bytes = _sdk_request_bytes([sdk_datum], config={"clip_low_threshold": 0.7, "kind": "abc"})
    assert sdk_pb.ForwardBackwardRequest.FromString(encode_forward_backward_request(ours)) == (
        sdk_pb.ForwardBackwardRequest.FromString(sdk_bytes)
    )
    decoded = decode_forward_backward_request(sdk_bytes)
    assert decoded.data[0].model_input_chunks[1] == WireImageChunk(b"\x89PNG", "png", 4)
    with pytest.raises(UserInputError) as err:
        decoded.data[0].input_tokens(datum_index=0)
    assert (err.value.field, err.value.datum_index) == ("model_input", 0)


def test_large_zstd_stream_without_declared_size():
    body = _golden_request_body()
    body.data = body.data * 12_000  # > 1 MiB, several read chunks
    raw = encode_forward_backward_request(body)
    compressor = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    compressed = compressor.compress(raw) + compressor.flush()
    assert len(decode_forward_backward_request(compressed, content_encoding="zstd").data) == 12_000


def test_sparse_tensor_claiming_a_huge_dense_shape_is_refused():
    def mutate(d):
        t = d.loss_fn_inputs["target_tokens"]
        t.Clear()
        t.dtype = sdk_pb.DTYPE_INT64
        t.shape.extend([1, 1 << 40])
        t.sparse_csr.crow_indices = np.array([0, 0], "<i8").tobytes()

    with pytest.raises(UserInputError, match="exceeds"):
        decode_forward_backward_request(_mutated_request(mutate))


def test_output_fields_must_cover_every_datum():
    msg = sdk_pb.ForwardBackwardOutput.FromString(GOLDEN_OUTPUT)
    msg.loss_fn_outputs[0].num_datums = 3
    with pytest.raises(ValueError, match="cover"):
        decode_forward_backward_output(msg.SerializeToString())
