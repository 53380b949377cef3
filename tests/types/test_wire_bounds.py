"""Class guard: every integer a client can send is range-checked, every stored blob is bounded.

Walks every request model of `tether.types.wire` (and the models nested in them) so a field added
later without bounds fails here, not as a server error on 2^70.
"""

from __future__ import annotations

import types
import typing

import annotated_types
import pytest
from pydantic import BaseModel

from tether.types import wire
from tether.types.errors import UserInputError
from tether.types.wire_base import MAX_USER_METADATA_BYTES, parse_wire


def _request_models() -> list[type[BaseModel]]:
    seen: dict[str, type[BaseModel]] = {}
    todo = [
        obj
        for name, obj in vars(wire).items()
        if isinstance(obj, type) and issubclass(obj, BaseModel) and name.endswith("Request")
    ]
    while todo:
        model = todo.pop()
        if model.__name__ in seen:
            continue
        seen[model.__name__] = model
        for field in model.model_fields.values():
            todo.extend(_nested_models(field.annotation))
    return list(seen.values())


def _nested_models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _nested_models(arg)]


def _unbounded_ints(annotation, metadata=()) -> bool:
    """True if `annotation` admits an int with no lower or upper bound."""
    if annotation is int:
        has_low = any(isinstance(m, (annotated_types.Ge, annotated_types.Gt)) for m in metadata)
        has_high = any(isinstance(m, (annotated_types.Le, annotated_types.Lt)) for m in metadata)
        return not (has_low and has_high)
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        flat = []
        for item in extra:
            flat.extend(getattr(item, "metadata", [item]))
        return _unbounded_ints(base, tuple(metadata) + tuple(flat))
    if typing.get_origin(annotation) is dict:
        return _unbounded_ints(typing.get_args(annotation)[1])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_unbounded_ints(arg, metadata) for arg in typing.get_args(annotation))
    return any(_unbounded_ints(arg) for arg in typing.get_args(annotation))


def test_every_integer_field_of_every_request_is_bounded():
    unbounded = []
    for model in _request_models():
        for name, field in model.model_fields.items():
            if _unbounded_ints(field.annotation, tuple(field.metadata)):
                unbounded.append(f"{model.__name__}.{name}")
    assert unbounded == []


@pytest.mark.parametrize("seed", [-1, 2**64, 2**70])
def test_seeds_outside_0_to_2_pow_64_are_user_errors(seed):
    with pytest.raises(UserInputError) as caught:
        parse_wire(
            wire.CreateModelRequest,
            {
                "session_id": "s",
                "model_seq_id": 0,
                "base_model": "m",
                "lora_config": {"rank": 4, "seed": seed},
            },
        )
    assert caught.value.field == "lora_config.seed"
    with pytest.raises(UserInputError):
        parse_wire(wire.SampleRequest, {"prompt": {"chunks": []}, "sampling_params": {"seed": seed}})
    assert parse_wire(wire.SamplingParams, {"seed": 2**64 - 1}).seed == 2**64 - 1


def test_huge_or_negative_integers_are_user_errors():
    cases = [
        (
            wire.SampleRequest,
            {"prompt": {"chunks": [{"type": "encoded_text", "tokens": [2**70]}]}, "sampling_params": {}},
            "prompt.chunks.0.encoded_text.tokens.0",
        ),
        (wire.TensorDataJson, {"data": [1.0], "dtype": "float32", "shape": [-1]}, "shape.0"),
        (wire.OptimStepRequest, {"model_id": "m", "seq_id": 2**64}, "seq_id"),
        (
            wire.CreateModelRequest,
            {"session_id": "s", "model_seq_id": 0, "base_model": "m", "lora_config": {"rank": 2**70}},
            "lora_config.rank",
        ),
    ]
    for model, body, field in cases:
        with pytest.raises(UserInputError) as caught:
            parse_wire(model, body)
        assert caught.value.field == field, caught.value


def test_user_metadata_and_tags_are_bounded():
    big = {"k": "x" * MAX_USER_METADATA_BYTES}
    with pytest.raises(UserInputError) as caught:
        parse_wire(wire.CreateSessionRequest, {"tags": [], "sdk_version": "t", "user_metadata": big})
    assert caught.value.field == "user_metadata"
    with pytest.raises(UserInputError):
        parse_wire(
            wire.CreateModelRequest,
            {"session_id": "s", "model_seq_id": 0, "base_model": "m", "user_metadata": big},
        )
    with pytest.raises(UserInputError):
        parse_wire(wire.SaveWeightsRequest, {"model_id": "m", "path": "p", "user_metadata": big})
    with pytest.raises(UserInputError) as caught:
        parse_wire(wire.CreateSessionRequest, {"tags": ["t"] * 1000, "sdk_version": "t"})
    assert caught.value.field == "tags"
    small = parse_wire(
        wire.CreateSessionRequest, {"tags": ["a"], "sdk_version": "t", "user_metadata": {"a": 1}}
    )
    assert small.user_metadata == {"a": 1}


def test_sparse_json_tensor_cannot_claim_a_huge_dense_shape():
    tensor = wire.TensorDataJson(
        data=[], dtype="float32", shape=[1, 2**40], sparse_crow_indices=[0, 0], sparse_col_indices=[]
    )
    with pytest.raises(UserInputError, match="densify"):
        tensor.to_numpy(field="target_prompt_logprobs")


def test_sparse_proto_tensors_share_one_budget_per_request():
    import numpy as np

    from tether.types.proto import (
        ForwardBackwardRequestBody,
        WireDatum,
        WireTextChunk,
        decode_forward_backward_request,
        encode_forward_backward_request,
    )
    from tether.types.proto_schema import Tensor

    body = ForwardBackwardRequestBody(
        model_id="m",
        seq_id=0,
        forward_only=False,
        loss_fn="cross_entropy",
        loss_fn_config=None,
        data=[
            WireDatum(
                model_input_chunks=[WireTextChunk(tokens=np.arange(3))],
                loss_fn_inputs={"target_tokens": np.arange(3), "weights": np.ones(3, np.float32)},
            )
        ]
        * 3,
    )
    raw = encode_forward_backward_request(body)
    from tether.types import proto_schema as pb

    msg = pb.ForwardBackwardRequest.FromString(raw)
    for datum in msg.data:  # each claims 1000 x 1000 float32 cells: 4 MB each, 12 MB together
        sparse = Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1000, 1000])
        sparse.sparse_csr.crow_indices = np.zeros(1001, "<i8").tobytes()
        datum.loss_fn_inputs["weights"].CopyFrom(sparse)
    crafted = msg.SerializeToString()
    assert len(decode_forward_backward_request(crafted, max_dense_bytes=12_000_000).data) == 3
    with pytest.raises(UserInputError) as caught:
        decode_forward_backward_request(crafted, max_dense_bytes=10_000_000)
    assert caught.value.datum_index == 2 and caught.value.field == "loss_fn_inputs.weights"


def test_zstd_bomb_stops_at_the_limit():
    import zstandard

    from tether.types.proto_tensors import decompress_body

    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (8 << 20))
    assert len(bomb) < 4096
    with pytest.raises(UserInputError, match="exceeds"):
        decompress_body(bomb, "zstd", max_bytes=1 << 20)
    assert len(decompress_body(bomb, "zstd", max_bytes=8 << 20)) == 8 << 20
