"""Pins the public surface of `import tether`: removing or renaming a name must be deliberate."""

from __future__ import annotations

import inspect

import tether

EXPECTED = {
    "__version__",
    "ServiceClient", "TrainingClient", "SamplingClient", "RestClient", "APIFuture",
    "datum_from_model_input_weights",
    "ModelInput", "EncodedTextChunk", "TensorData", "Datum", "AdamParams", "GradAccNormalization",
    "SamplingParams", "LoraConfig",
    "ForwardBackwardOutput", "OptimStepResponse", "SaveWeightsResponse", "SaveWeightsForSamplerResponse",
    "SampleResponse", "SampledSequence", "Checkpoint", "TrainingRun", "GetInfoResponse",
    "GetServerCapabilitiesResponse",
    "TetherError", "UserInputError", "AuthenticationError", "NotFoundError", "ConflictError", "OverloadedError",
    "ServerError",
}  # fmt: skip


def test_public_names_are_pinned_and_resolve() -> None:
    assert set(tether.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(tether, name) is not None


def test_method_names_match_the_tinker_sdk_where_they_overlap() -> None:
    surface = {
        tether.ServiceClient: ["create_lora_training_client", "create_training_client_from_state",
                               "create_training_client_from_state_with_optimizer", "create_sampling_client",
                               "get_server_capabilities", "create_rest_client", "close"],
        tether.TrainingClient: ["forward", "forward_backward", "forward_backward_custom", "optim_step",
                                "save_state", "save_weights_for_sampler", "save_weights_and_get_sampling_client",
                                "create_sampling_client", "get_info", "get_tokenizer"],
        tether.SamplingClient: ["sample", "compute_logprobs", "get_base_model", "get_tokenizer"],
        tether.APIFuture: ["result", "result_async", "add_done_callback", "future", "__await__"],
    }  # fmt: skip
    for cls, methods in surface.items():
        for method in methods:
            assert callable(getattr(cls, method)), f"{cls.__name__}.{method}"
    params = inspect.signature(tether.ServiceClient.create_lora_training_client).parameters
    assert list(params)[1:7] == ["base_model", "rank", "seed", "train_mlp", "train_attn", "train_unembed"]
    assert params["rank"].default == 32
    sample = inspect.signature(tether.SamplingClient.sample).parameters
    assert list(sample)[1:5] == ["prompt", "num_samples", "sampling_params", "include_prompt_logprobs"]
