"""Requests in the types of whichever SDK a client comes from: tether's, or the official `tinker`.

Recipes build datums, prompts and parameters with tether's types. tether's clients take them
as they are; the official tinker SDK wants its own classes, so for a client from the `tinker`
package this converts them (by value: token ids, flat tensors, plain fields). Results need no
conversion: both SDKs answer with the same field names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tether.types.data import AdamParams, Datum, ModelInput, SamplingParams


def uses_tinker_sdk(client: Any) -> bool:
    return type(client).__module__.split(".", 1)[0] == "tinker"


class SdkTypes:
    """Converters bound to one client's SDK."""

    def __init__(self, client: Any) -> None:
        self.tinker = uses_tinker_sdk(client)

    def model_input(self, model_input: ModelInput) -> Any:
        if not self.tinker:
            return model_input
        import tinker.types

        return tinker.types.ModelInput.from_ints(model_input.to_ints())

    def datum(self, datum: Datum) -> Any:
        if not self.tinker:
            return datum
        import tinker.types

        inputs = {}
        for key, tensor in datum.loss_fn_inputs.items():
            array = np.asarray(tensor.to_numpy())
            inputs[key] = tinker.types.TensorData(
                data=array.reshape(-1).tolist(), dtype=tensor.dtype, shape=list(array.shape)
            )
        return tinker.types.Datum(model_input=self.model_input(datum.model_input), loss_fn_inputs=inputs)

    def data(self, datums: list[Datum]) -> list[Any]:
        return [self.datum(d) for d in datums]

    def sampling_params(self, params: SamplingParams) -> Any:
        if not self.tinker:
            return params
        import tinker.types

        return tinker.types.SamplingParams(**params.model_dump())

    def adam_params(self, learning_rate: float) -> Any:
        params = AdamParams(learning_rate=learning_rate)
        if not self.tinker:
            return params
        import tinker.types

        return tinker.types.AdamParams(**params.model_dump())
