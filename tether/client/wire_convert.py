"""Conversions between the SDK's user types (`tether.types.data`) and the wire bodies.

Protobuf bodies go through the shared codecs of `tether.types.proto`, JSON bodies are the wire
models of `tether.types.wire`; this module converts the SDK's user types to and from both.
Client-side validation also lives here, because it runs exactly when a datum is put on the wire:
lengths that disagree and wrong dtypes are caught before a request is sent, with an error naming
the datum index and the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tether.types.data import (
    Datum,
    ForwardBackwardOutput,
    ModelInput,
    ProvenanceSpan,
    SampledProvenanceSpan,
    SampledSequence,
    SampleResponse,
    TensorData,
)
from tether.types.errors import UserInputError
from tether.types.proto import (
    ForwardBackwardOutputBody,
    SampleResponseBody,
    WireDatum,
    WireProvenanceSpan,
    WireTextChunk,
    topk_to_rows,
)
from tether.types.wire import EncodedTextChunkJson, ModelInputJson

# loss_fn_inputs whose dtype is fixed by the protocol (tinker-protocol.md §5.4).
_EXPECTED_DTYPES = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
}


def validate_datums(data: Sequence[Any]) -> list[Datum]:
    """Coerce `data` to Datums and check each one's loss inputs against its input length.

    Every per-token loss input must have the model input's length N along its first axis, and the
    known keys must have their protocol dtype. Raises UserInputError naming the datum and field.
    """
    if isinstance(data, Datum) or not isinstance(data, Sequence):
        raise UserInputError("must be a list of Datum", field="data")
    datums: list[Datum] = []
    for index, item in enumerate(data):
        try:
            datum = Datum.coerce(item)
        except UserInputError as exc:
            raise UserInputError(exc.message, field=exc.field, datum_index=index) from exc
        length = datum.model_input.length
        if length == 0:
            raise UserInputError("is empty", field="model_input", datum_index=index)
        for key, tensor in datum.loss_fn_inputs.items():
            expected = _EXPECTED_DTYPES.get(key)
            if expected is not None and tensor.dtype != expected:
                raise UserInputError(
                    f"must be {expected}, got {tensor.dtype}",
                    field=f"loss_fn_inputs.{key}",
                    datum_index=index,
                )
            shape = tensor.shape
            if not shape or shape[0] != length:
                raise UserInputError(
                    f"has shape {shape} but model_input has {length} tokens",
                    field=f"loss_fn_inputs.{key}",
                    datum_index=index,
                )
        datums.append(datum)
    return datums


def to_wire_datum(datum: Datum) -> WireDatum:
    return WireDatum(
        model_input_chunks=[
            WireTextChunk(tokens=np.asarray(c.tokens, dtype=np.int64)) for c in datum.model_input.chunks
        ],
        loss_fn_inputs={key: tensor.to_numpy() for key, tensor in datum.loss_fn_inputs.items()},
        model_input_spans=_wire_spans(datum.model_input_spans),
        loss_fn_input_spans=_wire_spans(datum.loss_fn_input_spans),
    )


def _wire_spans(spans: Sequence[ProvenanceSpan] | None) -> list[WireProvenanceSpan] | None:
    if spans is None:
        return None
    return [
        WireProvenanceSpan(
            kind="sampled" if isinstance(span, SampledProvenanceSpan) else "prompt",
            sequence_id=span.sequence_id,
            offset=span.offset,
            length=span.length,
        )
        for span in spans
    ]


def forward_output_from_wire(body: ForwardBackwardOutputBody) -> ForwardBackwardOutput:
    return ForwardBackwardOutput(
        loss_fn_output_type=body.loss_fn_output_type,
        loss_fn_outputs=[
            {name: TensorData.from_numpy(a) for name, a in d.items()} for d in body.loss_fn_outputs
        ],
        metrics=dict(body.metrics),
    )


def sample_response_from_wire(body: SampleResponseBody, sequence_ids: Sequence[str] | None) -> SampleResponse:
    ids = list(sequence_ids or [])
    sequences = [
        SampledSequence(
            stop_reason=s.stop_reason,
            tokens=[int(t) for t in s.tokens],
            logprobs=None if s.logprobs is None else [float(v) for v in s.logprobs],
            sequence_id=ids[i] if i < len(ids) else None,
        )
        for i, s in enumerate(body.sequences)
    ]
    prompt_logprobs = None
    if body.prompt_logprobs is not None:
        prompt_logprobs = [None if v is None or np.isnan(v) else float(v) for v in body.prompt_logprobs]
    topk = topk_to_rows(body.topk_prompt_logprobs) if body.topk_prompt_logprobs is not None else None
    return SampleResponse(sequences=sequences, prompt_logprobs=prompt_logprobs, topk_prompt_logprobs=topk)


def model_input_wire(model_input: ModelInput) -> ModelInputJson:
    """The JSON wire form of a prompt (sample requests)."""
    return ModelInputJson(chunks=[EncodedTextChunkJson(tokens=list(c.tokens)) for c in model_input.chunks])
