"""The SDK's user types: construction, conversion (numpy, torch, the tinker package) and validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tether.client.datum_helpers import datum_from_model_input_weights
from tether.types.data import AdamParams, Datum, EncodedTextChunk, ModelInput, SamplingParams, TensorData
from tether.types.errors import UserInputError


def test_model_input_helpers() -> None:
    mi = ModelInput.from_ints([1, 2, 3]).append(EncodedTextChunk(tokens=[4])).append_int(5)
    assert mi.to_ints() == [1, 2, 3, 4, 5]
    assert mi.length == 5
    assert len(mi.chunks) == 3
    assert ModelInput.empty().length == 0


def test_tensor_data_round_trips_numpy_and_torch() -> None:
    arr = np.arange(6, dtype=np.float64).reshape(2, 3)
    td = TensorData.from_numpy(arr)
    assert td.dtype == "float32" and td.shape == [2, 3]
    assert td.data == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert td.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    t = TensorData.from_torch(torch.tensor([1.5, 2.5], dtype=torch.bfloat16))
    assert t.dtype == "float32" and t.to_torch().tolist() == [1.5, 2.5]
    ints = TensorData.from_torch(torch.tensor([[1, 2]], dtype=torch.int32))
    assert ints.dtype == "int64" and ints.to_numpy().dtype == np.int64 and ints.shape == [1, 2]


def test_tensor_data_rejects_bad_dtype_and_shape() -> None:
    with pytest.raises(UserInputError, match="dtype"):
        TensorData([1, 2], "float16")
    with pytest.raises(UserInputError, match="shape"):
        TensorData([1, 2, 3], "int64", [2, 2])


def test_datum_converts_plain_lists_by_key() -> None:
    d = Datum(
        model_input=ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3], "weights": [0, 1]}
    )
    assert d.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert d.loss_fn_inputs["weights"].dtype == "float32"
    with pytest.raises(UserInputError, match="mask"):
        Datum(model_input=ModelInput.from_ints([1]), loss_fn_inputs={"mask": [1]})


def test_accepts_tinker_package_objects() -> None:
    tinker = pytest.importorskip("tinker")
    td = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": [1.0, 0.5, 0.0]},
    )
    d = Datum.coerce(td)
    assert d.model_input.to_ints() == [5, 6, 7]
    assert d.loss_fn_inputs["weights"].tolist() == [1.0, 0.5, 0.0]
    assert d.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert AdamParams.coerce(tinker.AdamParams(learning_rate=3e-3, beta2=0.99)) == AdamParams(
        learning_rate=3e-3, beta2=0.99
    )
    sp = SamplingParams.coerce(tinker.SamplingParams(max_tokens=7, stop=["x"]))
    assert sp.max_tokens == 7 and sp.stop == ["x"]


def test_datum_from_model_input_weights_cookbook_example() -> None:
    # tinker-cookbook.md §2.6 worked example.
    mi = ModelInput(chunks=[EncodedTextChunk(tokens=[10, 11, 12]), EncodedTextChunk(tokens=[20, 21, 22, 23])])
    weights = [0, 0, 0, 1, 1, 1, 1]
    d = datum_from_model_input_weights(mi, weights, reduction="none")
    assert d.model_input.to_ints() == [10, 11, 12, 20, 21, 22]
    assert d.loss_fn_inputs["target_tokens"].tolist() == [11, 12, 20, 21, 22, 23]
    assert d.loss_fn_inputs["weights"].tolist() == [0, 0, 1, 1, 1, 1]
    mean = datum_from_model_input_weights(mi, weights, reduction="mean")
    assert mean.loss_fn_inputs["weights"].tolist() == [0, 0, 0.25, 0.25, 0.25, 0.25]
    cut = datum_from_model_input_weights(mi, weights, max_length=5, reduction="none")
    assert cut.model_input.to_ints() == [10, 11, 12, 20]
    assert cut.loss_fn_inputs["target_tokens"].tolist() == [11, 12, 20, 21]
    assert cut.loss_fn_inputs["weights"].tolist() == [0, 0, 1, 1]
    # A completion truncated away keeps an all-zero-weight datum (mean skips the zero sum).
    gone = datum_from_model_input_weights(mi, weights, max_length=3, reduction="mean")
    assert gone.loss_fn_inputs["weights"].tolist() == [0, 0]


def test_datum_from_model_input_weights_rejects_length_mismatch() -> None:
    with pytest.raises(UserInputError, match="weights"):
        datum_from_model_input_weights(ModelInput.from_ints([1, 2, 3]), [1, 1])
