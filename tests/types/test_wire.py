"""JSON wire models: the reference's observed bodies, the official SDK's requests, and SDK
validation of what tether answers."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest
from tinker import types as tt
from tinker.types import _pydantic_types as tpt
from tinker.types.shared.untyped_api_future import UntypedAPIFuture as SdkFuture
from tinker.types.try_again_response import TryAgainResponse as SdkTryAgain

from tether.types import wire
from tether.types.errors import UserInputError
from tether.types.wire import dump_wire, parse_wire


def _sdk_json(request) -> dict:
    return json.loads(json.dumps(request.model_dump(mode="json", exclude_none=True)))


# Bodies observed on the wire (tinker-protocol.md §3).
OBSERVED = [
    (
        wire.CreateSessionRequest,
        {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0", "type": "create_session"},
    ),
    (
        wire.CreateModelRequest,
        {
            "session_id": "sess-abc",
            "model_seq_id": 0,
            "base_model": "Qwen/Qwen3-8B",
            "lora_config": {"rank": 8, "train_unembed": True, "train_mlp": True, "train_attn": True},
            "optimizer_config": {"type": "adamw"},
            "type": "create_model",
        },
    ),
    (
        wire.GetInfoResponse,
        {
            "type": "get_info",
            "model_id": "sess-abc:train:0",
            "model_data": {"arch": "qwen3", "model_name": "Qwen/Qwen3-8B", "tokenizer_id": "Qwen/Qwen3-8B"},
            "is_lora": True,
            "lora_rank": 8,
            "model_name": "Qwen/Qwen3-8B",
            "optimizer_config": {"type": "adamw"},
        },
    ),
    (
        wire.OptimStepRequest,
        {
            "model_id": "sess-abc:train:0",
            "seq_id": 2,
            "type": "optim_step",
            "adam_params": {
                "learning_rate": 0.0001,
                "beta1": 0.9,
                "beta2": 0.95,
                "eps": 1e-12,
                "weight_decay": 0.0,
                "grad_clip_norm": 0.0,
            },
        },
    ),
    (
        wire.SampleRequest,
        {
            "num_samples": 2,
            "prompt": {"chunks": [{"tokens": [1, 2, 3], "type": "encoded_text"}]},
            "sampling_params": {
                "max_tokens": 3,
                "stop": ["\n"],
                "temperature": 0.7,
                "top_k": -1,
                "top_p": 1.0,
            },
            "sampling_session_id": "sess-abc:sample:0",
            "seq_id": 0,
            "prompt_logprobs": True,
            "topk_prompt_logprobs": 0,
            "topk_sample_logprobs": 0,
            "prompt_alt_tokens_k": 0,
            "record_stability_info": False,
            "type": "sample",
        },
    ),
    (
        wire.TelemetrySendRequest,
        {
            "events": [
                {
                    "event": "SESSION_START",
                    "event_id": "2171327d",
                    "event_session_index": 0,
                    "severity": "INFO",
                    "timestamp": "2026-11-28T19:23:06.609670Z",
                }
            ],
            "platform": "Linux",
            "sdk_version": "0.38.0",
            "session_id": "sess-abc",
            "process_uuid": "55d1a6b5",
        },
    ),
    (wire.SessionHeartbeatRequest, {"session_id": "sess-abc", "type": "session_heartbeat"}),
    (wire.SessionFinishRequest, {"reason": {"type": "success"}, "detail": None}),
    (wire.FutureRetrieveRequest, {"request_id": "r1", "allow_metadata_only": True}),
    (wire.ClientConfigRequest, {"sdk_version": "0.38.0"}),
]


@pytest.mark.parametrize(("model", "body"), OBSERVED, ids=[m.__name__ for m, _ in OBSERVED])
def test_observed_bodies_parse_and_unknown_fields_are_ignored(model, body):
    parsed = parse_wire(model, json.dumps({**body, "some_future_field": 1}))
    assert "some_future_field" not in dump_wire(parsed)
    for key, value in body.items():
        if value is not None and key != "optimizer_config":
            dumped = dump_wire(parsed)[key]
            assert dumped == value or json.loads(json.dumps(dumped)) == value


def test_sample_request_details():
    body = parse_wire(wire.SampleRequest, OBSERVED[4][1])
    assert body.prompt.to_tokens() == [1, 2, 3]
    assert body.sampling_params.stop_strings == ["\n"] and body.sampling_params.stop_token_ids is None
    assert parse_wire(wire.SamplingParams, {"stop": [5, 6]}).stop_token_ids == [5, 6]
    assert parse_wire(wire.SamplingParams, {"stop": []}).stop == []
    assert parse_wire(wire.SamplingParams, {"stop": "x"}).stop_strings == ["x"]


def test_sdk_requests_parse():
    mi = tt.ModelInput.from_ints([4, 5])
    cases = [
        (
            wire.CreateModelRequest,
            tt.CreateModelRequest(
                session_id="s", model_seq_id=1, base_model="m", lora_config=tt.LoraConfig(rank=4, seed=3)
            ),
        ),
        (
            wire.OptimStepRequest,
            tt.OptimStepRequest(
                optim_params=tt.AdamParams(learning_rate=0.01), model_id="s:train:0", seq_id=3
            ),
        ),
        (
            wire.SaveWeightsRequest,
            tt.SaveWeightsRequest(model_id="s:train:0", path="a", seq_id=4, ttl_seconds=7200),
        ),
        (
            wire.SaveWeightsForSamplerRequest,
            tt.SaveWeightsForSamplerRequest(
                model_id="s:train:0", sampling_session_seq_id=0, kind="inflight", seq_id=5
            ),
        ),
        (
            wire.SaveWeightsExternalRequest,
            tt.SaveWeightsExternalRequest(model_id="s:train:0", path="e", seq_id=6),
        ),
        (
            wire.LoadWeightsRequest,
            tt.LoadWeightsRequest(
                session_id="s", model_seq_id=2, path="tinker://s:train:0/weights/a", optimizer=True
            ),
        ),
        (
            wire.LoadWeightsRequest,
            tt.LoadWeightsRequest(
                model_id="s:train:0", seq_id=1, path="tinker://s:train:0/weights/a", optimizer=False
            ),
        ),
        (
            wire.CreateSamplingSessionRequest,
            tt.CreateSamplingSessionRequest(
                session_id="s", sampling_session_seq_id=1, model_path="tinker://s:train:0/sampler_weights/x"
            ),
        ),
        (
            wire.SampleRequest,
            tt.SampleRequest(
                prompt=mi,
                sampling_params=tt.SamplingParams(max_tokens=2, stop=[7], seed=1),
                num_samples=3,
                sampling_session_id="s:sample:0",
                seq_id=0,
                target_prompt_logprobs=tpt.tensor_data.TensorData(data=[5, 6], dtype="int64", shape=[1, 2]),
            ),
        ),
        (
            wire.CreateSessionRequest,
            tt.CreateSessionRequest(tags=["a"], user_metadata=None, sdk_version="0.38.0", project_id="p"),
        ),
        (wire.GetInfoRequest, tt.GetInfoRequest(model_id="s:train:0")),
        (
            wire.FuturesRetrieveRequest,
            tt.FuturesRetrieveRequest(
                target={"sampling_session_id": "s:sample:0"}, retrieved_request_ids=["r"]
            ),
        ),
        (
            wire.CopyWeightsRequest,
            tt.CopyWeightsRequest(source_path="tinker://s:train:0/weights/a", destination_project_id="p"),
        ),
    ]
    for model, sdk_request in cases:
        sent = _sdk_json(sdk_request)
        parsed = parse_wire(model, sent)
        for key, value in dump_wire(parsed).items():
            if key in sent and key not in (
                "prompt",
                "sampling_params",
                "target_prompt_logprobs",
                "lora_config",
                "target",
            ):
                assert value == sent[key], (model.__name__, key)
    optim = parse_wire(wire.OptimStepRequest, _sdk_json(cases[1][1]))
    assert optim.adam_params is not None and optim.adam_params.learning_rate == 0.01
    assert parse_wire(wire.SaveWeightsForSamplerRequest, _sdk_json(cases[3][1])).is_ephemeral
    assert parse_wire(wire.LoadWeightsRequest, _sdk_json(cases[5][1])).creates_model
    assert not parse_wire(wire.LoadWeightsRequest, _sdk_json(cases[6][1])).creates_model
    sample = parse_wire(wire.SampleRequest, _sdk_json(cases[8][1]))
    assert sample.sampling_params.stop_token_ids == [7]
    np.testing.assert_array_equal(sample.target_prompt_logprobs.to_numpy(pad_value=-1), [[5, 6]])


@pytest.mark.parametrize(
    ("model", "body", "field"),
    [
        (wire.OptimStepRequest, {"model_id": "m", "adam_params": {"beta1": 1.5}}, "adam_params.beta1"),
        (
            wire.OptimStepRequest,
            {"model_id": "m", "adam_params": {"learning_rate": -1}},
            "adam_params.learning_rate",
        ),
        (wire.SaveWeightsRequest, {"model_id": "m", "path": "a", "ttl_seconds": 10}, "ttl_seconds"),
        (
            wire.SampleRequest,
            {"prompt": {"chunks": [{"tokens": ["x"], "type": "encoded_text"}]}, "sampling_params": {}},
            "prompt.chunks.encoded_text.tokens",
        ),
        (
            wire.SampleRequest,
            {"prompt": {"chunks": []}, "sampling_params": {"top_p": 0}},
            "sampling_params.top_p",
        ),
        (
            wire.SampleRequest,
            {"prompt": {"chunks": []}, "sampling_params": {}, "num_samples": 0},
            "num_samples",
        ),
        (wire.CreateModelRequest, {"session_id": "s", "base_model": "m"}, "model_seq_id"),
        (wire.CreateSessionRequest, {"sdk_version": "x"}, "tags"),
    ],
)
def test_invalid_bodies_are_user_errors_naming_the_field(model, body, field):
    with pytest.raises(UserInputError) as err:
        parse_wire(model, body)
    assert err.value.field is not None and err.value.field.startswith(field.split(".")[0])
    assert field.split(".")[-1] in err.value.field


def test_cross_field_rules():
    with pytest.raises(UserInputError):
        parse_wire(wire.SaveWeightsForSamplerRequest, {"model_id": "m"})
    with pytest.raises(UserInputError):
        parse_wire(wire.LoadWeightsRequest, {"path": "p", "optimizer": False})
    with pytest.raises(UserInputError):
        parse_wire(wire.LoadWeightsRequest, {"session_id": "s", "path": "p", "optimizer": False})
    with pytest.raises(UserInputError):
        parse_wire(
            wire.CreateModelRequest,
            {
                "session_id": "s",
                "model_seq_id": 0,
                "base_model": "m",
                "lora_config": {"rank": 4, "train_mlp": False, "train_attn": False, "train_unembed": False},
            },
        )
    with pytest.raises(UserInputError) as err:
        parse_wire(wire.CreateModelRequest, b"{not json")
    assert err.value.field == "body"
    assert parse_wire(wire.OptimStepRequest, {"model_id": "m"}).adam_params == wire.AdamParams()


def test_sdk_validates_tether_responses():
    now = datetime(2026, 11, 28, 20, 0, tzinfo=UTC)
    ckpt = wire.Checkpoint(
        checkpoint_id="weights/a",
        checkpoint_type="training",
        time=now,
        tinker_path="tinker://s:train:0/weights/a",
        size_bytes=10,
    )
    pairs = [
        (wire.CreateSessionResponse(session_id="s"), tt.CreateSessionResponse),
        (wire.CreateModelResponse(model_id="s:train:0"), tt.CreateModelResponse),
        (
            wire.GetInfoResponse(
                model_id="s:train:0",
                model_data=wire.ModelData(model_name="m", tokenizer_id="/tok"),
                is_lora=True,
                lora_rank=4,
            ),
            tpt.get_info_response.GetInfoResponse,
        ),
        (wire.OptimStepResponse(metrics={"grad_norm:mean": 1.0}), tpt.optim_step_response.OptimStepResponse),
        (wire.SaveWeightsResponse(path="tinker://s:train:0/weights/a"), tt.SaveWeightsResponse),
        (
            wire.SaveWeightsForSamplerResponse(sampling_session_id="s:sample:0"),
            tt.SaveWeightsForSamplerResponseInternal,
        ),
        (
            wire.SaveWeightsExternalResponse(path="tinker://s:train:0/external_weights/e", size_bytes=5),
            tt.SaveWeightsExternalResponseInternal,
        ),
        (wire.LoadWeightsResponse(model_id="s:train:1"), tpt.load_weights_response.LoadWeightsResponse),
        (
            wire.CreateSamplingSessionResponse(sampling_session_id="s:sample:1"),
            tt.CreateSamplingSessionResponse,
        ),
        (
            wire.GetSamplerResponse(sampler_id="s:sample:1", base_model="m"),
            tpt.get_sampler_response.GetSamplerResponse,
        ),
        (wire.UntypedAPIFuture(request_id="r", sample_sequence_ids=["a", "b"]), SdkFuture),
        (wire.TryAgainResponse(request_id="r"), SdkTryAgain),
        (wire.RequestFailedResponse(error="bad", category="user"), tt.RequestFailedResponse),
        (wire.ClientConfigResponse(proto_compress_fwdbwd=True), tt.ClientConfigResponse),
        (wire.ClientDynamicConfigResponse(), tt.ClientDynamicConfigResponse),
        (wire.TelemetryResponse(), tt.TelemetryResponse),
        (
            wire.GetServerCapabilitiesResponse(
                supported_models=[wire.SupportedModel(model_name="m", max_context_length=64)]
            ),
            tt.GetServerCapabilitiesResponse,
        ),
        (
            wire.TrainingRunsResponse(
                training_runs=[
                    wire.TrainingRun(
                        training_run_id="s:train:0",
                        base_model="m",
                        model_owner="me",
                        is_lora=True,
                        last_request_time=now,
                        last_checkpoint=ckpt,
                    )
                ],
                cursor=wire.Cursor(offset=0, limit=20, total_count=1),
            ),
            tt.TrainingRunsResponse,
        ),
        (wire.CheckpointsListResponse(checkpoints=[ckpt]), tt.CheckpointsListResponse),
        (wire.WeightsInfoResponse(base_model="m", is_lora=True, lora_rank=4), tt.WeightsInfoResponse),
        (wire.GetSessionResponse(training_run_ids=["s:train:0"], sampler_ids=[]), tt.GetSessionResponse),
        (wire.ListSessionsResponse(sessions=["s"]), tt.ListSessionsResponse),
        (wire.CopyWeightsResponse(tinker_path="tinker://x:train:0/weights/a"), tt.CopyWeightsResponse),
        (
            wire.FuturesRetrieveResponse(
                completions=[
                    wire.FutureFinished(request_id="r", response_payload_uncompressed_size=3),
                    wire.FutureFailed(request_id="q"),
                ],
                cursor=2,
            ),
            tt.FuturesRetrieveResponse,
        ),
        (wire.JoinSamplingSessionResponse(client_counter=1), tt.JoinSamplingSessionResponse),
        (
            wire.ExternalWeightsUrlsResponse(urls={"model.safetensors": "http://x/y"}, expires=now),
            tt.ExternalWeightsUrlsResponse,
        ),
    ]
    for ours, sdk_model in pairs:
        validated = sdk_model.model_validate(json.loads(json.dumps(dump_wire(ours))))
        assert validated is not None
    sdk_ckpt = tt.CheckpointsListResponse.model_validate(dump_wire(pairs[18][0])).checkpoints[0]
    assert sdk_ckpt.checkpoint_id == "weights/a" and sdk_ckpt.time == now


def test_tensor_data_json_sparse_and_errors():
    dense = wire.TensorDataJson(
        data=[3, 4], dtype="int64", shape=[2, 3], sparse_crow_indices=[0, 1, 2], sparse_col_indices=[2, 0]
    )
    np.testing.assert_array_equal(dense.to_numpy(pad_value=-1), [[-1, -1, 3], [4, -1, -1]])
    np.testing.assert_array_equal(wire.TensorDataJson(data=[1.0, 2.0], dtype="float32").to_numpy(), [1, 2])
    round_trip = wire.TensorDataJson.from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(round_trip.to_numpy(), np.arange(6).reshape(2, 3))
    with pytest.raises(UserInputError) as err:
        wire.TensorDataJson(data=[1, 2, 3], dtype="int64", shape=[2, 2]).to_numpy(
            field="logprob_grads", datum_index=1
        )
    assert (err.value.field, err.value.datum_index) == ("logprob_grads", 1)
    with pytest.raises(UserInputError):
        wire.TensorDataJson(
            data=[1], dtype="int64", shape=[2, 2], sparse_crow_indices=[0, 1, 1], sparse_col_indices=[9]
        ).to_numpy()


def test_backward_from_logprob_grads_extension():
    body = parse_wire(
        wire.BackwardFromLogprobGradsRequest,
        {
            "model_id": "s:train:0",
            "seq_id": 4,
            "graph_id": "req-3",
            "logprob_grads": [{"data": [0.5, -1.0], "dtype": "float32", "shape": [2]}],
            "type": "backward_from_logprob_grads",
        },
    )
    np.testing.assert_array_equal(body.logprob_grads[0].to_numpy(), [0.5, -1.0])
    assert dump_wire(wire.BackwardFromLogprobGradsResponse(metrics={"loss:sum": 1.0})) == {
        "metrics": {"loss:sum": 1.0}
    }


def test_user_params_are_the_wire_models_strict_in_code_and_lenient_on_the_wire():
    import tether
    from tether.types import data

    # One definition each: the SDK's user type is the wire model the server reads.
    for name in ("AdamParams", "SamplingParams", "LoraConfig"):
        assert getattr(tether, name) is getattr(data, name) is getattr(wire, name)
        assert issubclass(getattr(wire, name), wire.ParamsModel)
    # Built in code: a typo or a bad value is a UserInputError naming the field.
    with pytest.raises(UserInputError) as info:
        wire.AdamParams(lr=1e-3)
    assert info.value.field == "lr"
    with pytest.raises(UserInputError) as info:
        wire.SamplingParams(top_p=0)
    assert info.value.field == "top_p"
    with pytest.raises(UserInputError, match="at least one"):
        wire.LoraConfig(rank=4, train_mlp=False, train_attn=False, train_unembed=False)
    # Parsed from a body, alone or nested: unknown fields are ignored, bad values still name the field.
    assert parse_wire(wire.AdamParams, {"learning_rate": 0.5, "new_field": 1}).learning_rate == 0.5
    step = parse_wire(wire.OptimStepRequest, {"model_id": "m", "adam_params": {"beta1": 0.5, "new_field": 1}})
    assert step.adam_params == wire.AdamParams(beta1=0.5)
    with pytest.raises(UserInputError) as info:
        parse_wire(wire.OptimStepRequest, {"model_id": "m", "adam_params": {"beta1": 1.5}})
    assert info.value.field == "adam_params.beta1"
    # Frozen, and converted from the tinker package's objects or dicts.
    with pytest.raises(Exception, match="frozen"):
        wire.AdamParams().learning_rate = 1.0  # type: ignore[misc]
    assert wire.AdamParams.coerce(tt.AdamParams(learning_rate=3e-3)) == wire.AdamParams(learning_rate=3e-3)
    assert wire.LoraConfig.coerce({"rank": 2, "unknown": 1}) == wire.LoraConfig(rank=2)


def test_make_wire_names_the_bad_field():
    with pytest.raises(UserInputError) as info:
        wire.make_wire(wire.SaveWeightsRequest, model_id="m", path="x", ttl_seconds=5)
    assert info.value.field == "ttl_seconds"
    assert wire.make_wire(wire.SaveWeightsRequest, model_id="m", path="x").path == "x"
