"""tether: a self-hosted, Tinker-compatible training API for LLMs.

The public surface is the SDK: code written for the Tinker SDK ports by changing `import tinker` to
`import tether`. Names are resolved on first access, so importing a submodule (the server, the
engine) does not pull in the SDK.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # clients
    "ServiceClient": "tether.client",
    "TrainingClient": "tether.client",
    "SamplingClient": "tether.client",
    "RestClient": "tether.client",
    "APIFuture": "tether.client",
    "datum_from_model_input_weights": "tether.client",
    # data types
    "ModelInput": "tether.types.data",
    "EncodedTextChunk": "tether.types.data",
    "TensorData": "tether.types.data",
    "Datum": "tether.types.data",
    "AdamParams": "tether.types.data",
    "GradAccNormalization": "tether.types.data",
    "SamplingParams": "tether.types.data",
    "LoraConfig": "tether.types.data",
    "ForwardBackwardOutput": "tether.types.data",
    "OptimStepResponse": "tether.types.data",
    "SaveWeightsResponse": "tether.types.data",
    "SaveWeightsForSamplerResponse": "tether.types.data",
    "SampleResponse": "tether.types.data",
    "SampledSequence": "tether.types.data",
    "Checkpoint": "tether.types.data",
    "TrainingRun": "tether.types.data",
    "GetInfoResponse": "tether.types.data",
    "GetServerCapabilitiesResponse": "tether.types.data",
    # errors
    "TetherError": "tether.types.errors",
    "UserInputError": "tether.types.errors",
    "AuthenticationError": "tether.types.errors",
    "NotFoundError": "tether.types.errors",
    "ConflictError": "tether.types.errors",
    "OverloadedError": "tether.types.errors",
    "ServerError": "tether.types.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tether' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
