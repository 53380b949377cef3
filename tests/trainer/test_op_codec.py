"""The op encoding across the trainer process boundary: round trips, golden bytes, malformed frames."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from tether.types import ops
from tether.types.op_codec import (
    HEADER_SIZE,
    OpDecodeError,
    decode_op,
    decode_result,
    encode_op,
    encode_result,
    read_header,
)
from tether.types.wire import AdamParams, LoraConfig, SamplingParams


def _datum(n: int = 4) -> ops.TrainingDatum:
    return ops.TrainingDatum(
        input_tokens=np.arange(n, dtype=np.int64),
        loss_fn_inputs={
            "target_tokens": np.arange(1, n + 1, dtype=np.int64),
            "weights": np.linspace(0, 1, n, dtype=np.float32),
        },
    )


EVERY_OP = [
    ops.CreateModel(model_id="m", lora_config=LoraConfig(rank=4, seed=2**63)),
    ops.CreateModel(model_id="m"),
    ops.DeleteModel(model_id="m"),
    ops.Forward(model_id="m", data=[_datum()], loss_fn="cross_entropy"),
    ops.ForwardBackward(
        model_id="m", data=[_datum(), _datum(7)], loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.5}
    ),
    ops.OptimStep(model_id="m", adam_params=AdamParams(learning_rate=3e-4, grad_clip_norm=1.0)),
    ops.OptimStep(model_id="m", adam_params=AdamParams(), grad_accumulation_normalization="num_sequences"),
    ops.ForwardKeepGraph(model_id="m", data=[_datum()], graph_id="g", ttl_s=12.5),
    ops.BackwardFromLogprobGrads(model_id="m", graph_id="g", logprob_grads=[np.ones((3, 2), np.float32)]),
    ops.SaveState(model_id="m", owner="o", path="tinker://r/weights/a", overwrite=True),
    ops.LoadState(
        model_id="m", owner="o", path="tinker://r/weights/a", include_optimizer=True, create_model=False
    ),
    ops.SaveSamplerWeights(model_id="m", kind="ephemeral", owner="o", sampler_id="s"),
    ops.CreateSampler(sampler_id="s", owner="o", path="tinker://r/sampler_weights/a"),
    ops.DeleteSampler(sampler_id="s"),
    ops.Sample(
        sampler_id=None,
        prompt_tokens=[1, 2],
        num_samples=3,
        sampling_params=SamplingParams(max_tokens=5, seed=7, stop=["\n"]),
    ),
    ops.DescribeBase(),
]


def _roundtrip(op: ops.Op, *, stream: str | None = "m", seq_id: int | None = 3) -> ops.OpEnvelope:
    frame = encode_op(ops.OpEnvelope(op_id=41, stream=stream, seq_id=seq_id, op=op))
    length, op_id = read_header(frame[:HEADER_SIZE])
    assert op_id == 41 and length == len(frame) - HEADER_SIZE
    return decode_op(op_id, frame[HEADER_SIZE:])


def _assert_equal(a: object, b: object) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_equal(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)  # type: ignore[arg-type]
        for x, y in zip(a, b, strict=True):  # type: ignore[call-overload]
            _assert_equal(x, y)
    elif hasattr(a, "model_dump"):
        assert type(a) is type(b)
        _assert_equal(dict(a), dict(b))  # type: ignore[call-overload]
    else:
        assert a == b


@pytest.mark.parametrize(
    "op", EVERY_OP, ids=lambda op: op.type + ("" if not hasattr(op, "lora_config") else "-lora")
)
def test_every_op_round_trips_exactly(op):
    back = _roundtrip(op)
    assert back.stream == "m" and back.seq_id == 3
    _assert_equal(op, back.op)


def test_every_result_round_trips_exactly():
    results = [
        ops.Done(),
        ops.ForwardOutput(
            outputs=[{"logprobs": np.array([-0.5, np.nan, -np.inf], np.float32)}],
            metrics={"loss:sum": float("nan")},
        ),
        ops.MetricsOutput(metrics={"grad_norm:mean": 1.5}),
        ops.CheckpointWritten(path="tinker://r/weights/a", directory="/d", size_bytes=10),
        ops.SampleOutput(
            sequences=[
                ops.SampledSequenceOutput(
                    tokens=[1], logprobs=[-0.1], stop_reason="length", topk_logprobs=[[(1, -0.1), (2, -3.0)]]
                )
            ],
            prompt_logprobs=[None, -1.0],
        ),
        ops.BaseModelInfo(
            arch="qwen3", tokenizer_id="t", vocab_size=10, max_context_length=5, eos_token_ids=[1]
        ),
        ops.OpFailure(error_type="UserInputError", message="bad", field="f", datum_index=2),
    ]
    for result in results:
        frame = encode_result(ops.ResultEnvelope(op_id=9, result=result))
        back = decode_result(9, frame[HEADER_SIZE:]).result
        if isinstance(result, ops.ForwardOutput):  # NaN != NaN: compare the bytes
            assert back.outputs[0]["logprobs"].tobytes() == result.outputs[0]["logprobs"].tobytes()
            assert np.isnan(back.metrics["loss:sum"])
        else:
            _assert_equal(result, back)


def test_golden_bytes_of_a_small_op():
    """The wire form is a contract between processes of possibly different versions: pin it."""
    frame = encode_op(
        ops.OpEnvelope(
            op_id=1,
            stream="m",
            seq_id=2,
            op=ops.BackwardFromLogprobGrads(
                model_id="m", graph_id="g", logprob_grads=[np.array([1.0, -2.0], np.float32)]
            ),
        )
    )
    assert frame.hex() == GOLDEN_HEX


GOLDEN_HEX = (
    "0000007f000000000000000184a56f705f696401a673747265616da16da67365715f696402a26f7084a474797065bb6261636b77"
    "6172645f66726f6d5f6c6f6770726f625f6772616473a86d6f64656c5f6964a16da867726170685f6964a167ad6c6f6770726f"
    "625f677261647391c71101000792a33c663491020000803f000000c0"
)


def test_golden_bytes_of_an_optim_step():
    """The optimizer step's fields, `grad_accumulation_normalization` last (added for issue 13)."""
    frame = encode_op(
        ops.OpEnvelope(
            op_id=1,
            stream="m",
            seq_id=3,
            op=ops.OptimStep(
                model_id="m",
                adam_params=AdamParams(learning_rate=0.5),
                grad_accumulation_normalization="num_loss_tokens",
            ),
        )
    )
    assert frame.hex() == OPTIM_STEP_GOLDEN_HEX


OPTIM_STEP_GOLDEN_HEX = (
    "000000ed000000000000000184a56f705f696401a673747265616da16da67365715f696403a26f7084a474797065aa6f7074696d"
    "5f73746570a86d6f64656c5f6964a16dab6164616d5f706172616d7386ad6c6561726e696e675f72617465cb3fe0000000000000"
    "a56265746131cb3feccccccccccccda56265746132cb3fee666666666666a3657073cb3d719799812dea11ac7765696768745f64"
    "65636179cb0000000000000000ae677261645f636c69705f6e6f726dcb0000000000000000bf677261645f616363756d756c6174"
    "696f6e5f6e6f726d616c697a6174696f6eaf6e756d5f6c6f73735f746f6b656e73"
)


def test_golden_bytes_of_a_sample_cancel():
    """`CancelSample` (a remote `Sample` op's cancellation) has its own frame id and names its target."""
    frame = encode_op(ops.OpEnvelope(op_id=12, op=ops.CancelSample(target_op_id=7)))
    assert frame.hex() == CANCEL_SAMPLE_GOLDEN_HEX
    back = decode_op(12, frame[HEADER_SIZE:]).op
    assert back == ops.CancelSample(target_op_id=7)


CANCEL_SAMPLE_GOLDEN_HEX = (
    "00000045000000000000000c84a56f705f69640ca673747265616dc0a67365715f6964c0a26f7082a474797065ad63616e63656c"
    "5f73616d706c65ac7461726765745f6f705f696407"
)


def test_a_malformed_sample_cancel_is_that_frame_s_decode_error():
    for op in [{"type": "cancel_sample"}, {"type": "cancel_sample", "target_op_id": 1, "extra": 2}]:
        with pytest.raises(OpDecodeError) as caught:
            decode_op(6, msgpack.packb({"op_id": 6, "op": op}))
        assert caught.value.op_id == 6


def test_an_optim_step_from_a_sender_without_normalisation_means_none():
    body = msgpack.packb(
        {"op_id": 5, "op": {"type": "optim_step", "model_id": "m", "adam_params": {"learning_rate": 0.1}}}
    )
    op = decode_op(5, body).op
    assert isinstance(op, ops.OptimStep) and op.grad_accumulation_normalization == "none"
    bad = msgpack.packb(
        {
            "op_id": 5,
            "op": {
                "type": "optim_step",
                "model_id": "m",
                "adam_params": {},
                "grad_accumulation_normalization": "x",
            },
        }
    )
    with pytest.raises(OpDecodeError):
        decode_op(5, bad)


def test_a_failure_becomes_the_same_error_again():
    from tether.types.errors import NotFoundError, UserInputError

    failure = ops.OpFailure.from_exception(UserInputError("no", field="data", datum_index=3))
    err = failure.to_exception()
    assert isinstance(err, UserInputError) and err.field == "data" and err.datum_index == 3
    assert isinstance(ops.OpFailure.from_exception(NotFoundError("gone")).to_exception(), NotFoundError)
    assert ops.OpFailure.from_exception(RuntimeError("boom")).error_type == "ServerError"


MALFORMED = {
    "not msgpack": b"\xc1\xc1\xc1",
    "not a map": msgpack.packb([1, 2, 3]),
    "unknown op type": msgpack.packb({"op_id": 5, "op": {"type": "format_disk"}}),
    "missing field": msgpack.packb({"op_id": 5, "op": {"type": "optim_step"}}),
    "wrong field type": msgpack.packb({"op_id": 5, "op": {"type": "delete_model", "model_id": 7}}),
    "extra field": msgpack.packb({"op_id": 5, "op": {"type": "delete_model", "model_id": "m", "x": 1}}),
    "op id disagrees": msgpack.packb({"op_id": 6, "op": {"type": "delete_model", "model_id": "m"}}),
    "array of objects": msgpack.packb(
        {
            "op_id": 5,
            "op": {
                "type": "backward_from_logprob_grads",
                "model_id": "m",
                "graph_id": "g",
                "logprob_grads": [msgpack.ExtType(1, b"\x00\x0a" + msgpack.packb(["|O", [1]]))],
            },
        }
    ),
    "array shorter than its shape": msgpack.packb(
        {
            "op_id": 5,
            "op": {
                "type": "backward_from_logprob_grads",
                "model_id": "m",
                "graph_id": "g",
                "logprob_grads": [
                    msgpack.ExtType(
                        1, len(h := msgpack.packb(["<f4", [1000]])).to_bytes(2, "big") + h + b"\0" * 8
                    )
                ],
            },
        }
    ),
    "negative dimension": msgpack.packb(
        {
            "op_id": 5,
            "op": {
                "type": "backward_from_logprob_grads",
                "model_id": "m",
                "graph_id": "g",
                "logprob_grads": [
                    msgpack.ExtType(1, len(h := msgpack.packb(["<f4", [-1]])).to_bytes(2, "big") + h)
                ],
            },
        }
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_body_fails_its_op_with_its_id(name):
    with pytest.raises(OpDecodeError) as error:
        decode_op(5, MALFORMED[name])
    assert error.value.op_id == 5


def test_a_damaged_length_prefix_is_refused_before_allocating():
    with pytest.raises(ValueError):
        read_header((2**32 - 1).to_bytes(4, "big") + (1).to_bytes(8, "big")[:8])
    with pytest.raises(ValueError):
        read_header((3).to_bytes(4, "big") + (1).to_bytes(8, "big"))
