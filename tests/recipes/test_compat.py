"""Recipes' requests converted to the official tinker SDK's types, by value."""

from __future__ import annotations

import numpy as np
import pytest

from tether.recipes.compat import SdkTypes
from tether.recipes.rl_data import rl_datum
from tether.types.data import ModelInput, SamplingParams

tinker_types = pytest.importorskip("tinker.types")


def _client_from(module: str):
    return type("TrainingClient", (), {"__module__": module})()


def test_tether_clients_get_tether_objects_unchanged():
    sdk = SdkTypes(_client_from("tether.client.training_client"))
    datum = rl_datum(ModelInput.from_ints([1, 2]), [3], [-0.5], 1.0)
    assert sdk.datum(datum) is datum
    assert sdk.adam_params(0.01).learning_rate == 0.01


def test_tinker_clients_get_equal_tinker_objects():
    sdk = SdkTypes(_client_from("tinker.lib.public_interfaces.training_client"))
    datum = rl_datum(ModelInput.from_ints([1, 2, 3]), [4, 5], [-0.5, -0.25], 0.5)
    converted = sdk.datum(datum)
    assert isinstance(converted, tinker_types.Datum)
    assert converted.model_input.to_ints() == [1, 2, 3, 4]
    for key, tensor in datum.loss_fn_inputs.items():
        np.testing.assert_array_equal(converted.loss_fn_inputs[key].to_numpy(), tensor.to_numpy())
        assert converted.loss_fn_inputs[key].dtype == tensor.dtype
    params = sdk.sampling_params(SamplingParams(max_tokens=3, temperature=0.0, stop=[256], seed=7))
    assert isinstance(params, tinker_types.SamplingParams)
    assert (params.max_tokens, params.temperature, list(params.stop), params.seed) == (3, 0.0, [256], 7)
    adam = sdk.adam_params(3e-4)
    assert isinstance(adam, tinker_types.AdamParams) and adam.learning_rate == 3e-4
