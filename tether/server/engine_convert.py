"""Conversions between decoded wire bodies (numpy) and the engines' torch types.

They run on worker threads, inside the queued operation, so torch is imported lazily and the
server's route modules stay torch-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tether.types.errors import UserInputError
from tether.types.proto import WireDatum


def engine_data(data: list[WireDatum]) -> list[Any]:
    """`EngineDatum`s from decoded protobuf datums."""
    import torch

    from tether.engine.training_types import EngineDatum

    out = []
    for index, datum in enumerate(data):
        try:
            tokens = datum.input_tokens()
        except UserInputError as exc:
            raise UserInputError(exc.message, datum_index=index) from None
        inputs = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in datum.loss_fn_inputs.items()}
        out.append(EngineDatum(input_tokens=torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)), loss_fn_inputs=inputs))
    return out


def numpy_outputs(outputs: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
    """Per-datum engine outputs (torch) as numpy arrays for the protobuf encoder."""
    return [{name: value.detach().cpu().numpy() for name, value in datum.items()} for datum in outputs]


def float_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.items()}
