"""Provenance spans on training datums: their checks, and how stable_reinforce reads them.

A datum's provenance is two lists of runs (tinker-protocol.md §5.3): `model_input_spans` tile its
input tokens and `loss_fn_input_spans` tile its `target_tokens`, in order. A `prompt` run claims
that its positions are positions `[offset, offset + length)` of the prompt of the sample request
that returned `sequence_id`; a `sampled` run claims they are those positions of that sequence's
sampled tokens.

`check_tiling` applies to every loss (the cookbook attaches spans whenever it has sequence ids).
`resolve_sampled_inputs` is what `stable_reinforce` needs on top: every named sequence must have
been recorded (`record_stability_info=true`), every input token a run claims and every target
token a sampled run claims must equal the recorded one (targets under prompt runs are not trained
and clients fill them freely), advantages must be zero off the sampled positions, and it returns the sampler's recorded logprobs
and the sampled-position mask that the loss reads. A datum that fails any check is refused with
the field and the datum index, so a run never trains on half-matching data.

Torch-free; knows nothing about where records are kept (the caller passes a lookup).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tether.types.errors import UserInputError
from tether.types.proto_training import WireProvenanceSpan

__all__ = ["SequenceRecord", "check_tiling", "resolve_sampled_inputs"]


@dataclass(frozen=True)
class SequenceRecord:
    """What the server keeps about one sequence sampled with `record_stability_info=true`."""

    prompt: np.ndarray
    """int64 (P,): the sample request's prompt tokens."""
    tokens: np.ndarray
    """int64 (T,): the sampled tokens, stop token included."""
    logprobs: np.ndarray
    """float32 (T,): the sampler's log-probability of each sampled token (untempered)."""


SequenceLookup = Callable[[str], "SequenceRecord | None"]


def check_tiling(
    spans: Sequence[WireProvenanceSpan] | None,
    length: int,
    *,
    field: str,
    datum_index: int,
) -> None:
    """`spans` cover exactly `length` positions with non-empty ids and non-negative offsets/lengths."""
    if spans is None:
        return
    total = 0
    for k, span in enumerate(spans):
        where = f"{field}.{k}"
        if not span.sequence_id:
            raise UserInputError(
                "sequence_id must be non-empty", field=f"{where}.sequence_id", datum_index=datum_index
            )
        if span.offset < 0:
            raise UserInputError(
                f"offset {span.offset} must be >= 0", field=f"{where}.offset", datum_index=datum_index
            )
        if span.length < 0:
            raise UserInputError(
                f"length {span.length} must be >= 0", field=f"{where}.length", datum_index=datum_index
            )
        total += span.length
    if total != length:
        raise UserInputError(
            f"spans cover {total} positions but the field has {length}; the runs must tile it exactly",
            field=field,
            datum_index=datum_index,
        )


def check_datum_spans(
    model_input_spans: Sequence[WireProvenanceSpan] | None,
    loss_fn_input_spans: Sequence[WireProvenanceSpan] | None,
    *,
    input_length: int,
    target_length: int | None,
    datum_index: int,
) -> None:
    """Both lists or neither; each tiles its field (`target_length` None: targets are not 1-D)."""
    if (model_input_spans is None) != (loss_fn_input_spans is None):
        missing = "model_input_spans" if model_input_spans is None else "loss_fn_input_spans"
        raise UserInputError(
            "provenance comes as a pair: send both span lists or neither",
            field=missing,
            datum_index=datum_index,
        )
    check_tiling(model_input_spans, input_length, field="model_input_spans", datum_index=datum_index)
    if target_length is not None:
        check_tiling(loss_fn_input_spans, target_length, field="loss_fn_input_spans", datum_index=datum_index)


def _claimed(
    spans: Sequence[WireProvenanceSpan],
    tokens: np.ndarray,
    lookup: SequenceLookup,
    *,
    field: str,
    datum_index: int,
    check_prompt_tokens: bool = True,
) -> list[tuple[WireProvenanceSpan, SequenceRecord, int]]:
    """Each span with its record and its start position in the datum field; tokens checked (a prompt
    run's only when `check_prompt_tokens`)."""
    out = []
    start = 0
    for k, span in enumerate(spans):
        record = lookup(span.sequence_id)
        if record is None:
            raise UserInputError(
                f"sequence {span.sequence_id!r} is unknown in this session or expired: stable_reinforce "
                "needs sequences sampled in the same session with record_stability_info=true",
                field=f"{field}.{k}.sequence_id",
                datum_index=datum_index,
            )
        source = record.tokens if span.kind == "sampled" else record.prompt
        end = span.offset + span.length
        if end > source.shape[0]:
            what = "sampled tokens" if span.kind == "sampled" else "prompt"
            raise UserInputError(
                f"positions [{span.offset}, {end}) are past the end of the sequence's {what} ({source.shape[0]} tokens)",
                field=f"{field}.{k}",
                datum_index=datum_index,
            )
        got = tokens[start : start + span.length]
        want = source[span.offset : end]
        if (span.kind == "sampled" or check_prompt_tokens) and not np.array_equal(got, want):
            bad = int(np.flatnonzero(got != want)[0])
            raise UserInputError(
                f"position {start + bad} holds token {int(got[bad])} but the {span.kind} run claims "
                f"token {int(want[bad])} of sequence {span.sequence_id!r}",
                field=f"{field}.{k}",
                datum_index=datum_index,
            )
        out.append((span, record, start))
        start += span.length
    return out


def resolve_sampled_inputs(
    input_tokens: np.ndarray,
    loss_fn_inputs: dict[str, np.ndarray],
    model_input_spans: Sequence[WireProvenanceSpan] | None,
    loss_fn_input_spans: Sequence[WireProvenanceSpan] | None,
    lookup: SequenceLookup,
    *,
    datum_index: int,
) -> dict[str, np.ndarray]:
    """The datum's loss inputs with `logprobs` (recorded sampler logprobs on sampled positions, 0
    elsewhere) and `sampled_mask` (1.0 on sampled positions) filled in from the records.

    Raises UserInputError naming the field and `datum_index` when provenance is missing, does not
    tile, names an unknown sequence, claims tokens the record does not hold, or when `advantages`
    is non-zero on a position that is not sampled.
    """
    if model_input_spans is None or loss_fn_input_spans is None:
        raise UserInputError(
            "stable_reinforce needs provenance on every datum (Datum.with_provenance with the "
            "sequence_id of each sampled sequence)",
            field="loss_fn_input_spans" if loss_fn_input_spans is None else "model_input_spans",
            datum_index=datum_index,
        )
    targets = loss_fn_inputs.get("target_tokens")
    if targets is None:
        raise UserInputError(
            "missing, required by this loss", field="loss_fn_inputs.target_tokens", datum_index=datum_index
        )
    if targets.ndim != 1:
        raise UserInputError(
            f"stable_reinforce needs 1-D target_tokens, got shape {tuple(targets.shape)}",
            field="loss_fn_inputs.target_tokens",
            datum_index=datum_index,
        )
    advantages = loss_fn_inputs.get("advantages")
    if advantages is None:
        raise UserInputError(
            "missing, required by this loss", field="loss_fn_inputs.advantages", datum_index=datum_index
        )
    if advantages.shape != targets.shape:
        raise UserInputError(
            f"shape {tuple(advantages.shape)} must equal target_tokens' shape {tuple(targets.shape)}",
            field="loss_fn_inputs.advantages",
            datum_index=datum_index,
        )
    check_datum_spans(
        model_input_spans,
        loss_fn_input_spans,
        input_length=int(input_tokens.shape[0]),
        target_length=int(targets.shape[0]),
        datum_index=datum_index,
    )
    _claimed(model_input_spans, input_tokens, lookup, field="model_input_spans", datum_index=datum_index)
    logprobs = np.zeros(targets.shape, dtype=np.float32)
    mask = np.zeros(targets.shape, dtype=np.float32)
    # Targets under a prompt run are never trained (zero advantage, checked below), and clients fill
    # them freely (the cookbook's rl_loop sends zeros there), so only sampled runs must match.
    for span, record, start in _claimed(
        loss_fn_input_spans,
        targets,
        lookup,
        field="loss_fn_input_spans",
        datum_index=datum_index,
        check_prompt_tokens=False,
    ):
        if span.kind == "sampled":
            logprobs[start : start + span.length] = record.logprobs[span.offset : span.offset + span.length]
            mask[start : start + span.length] = 1.0
    off_sampled = np.flatnonzero((mask == 0) & (np.asarray(advantages) != 0))
    if off_sampled.size:
        raise UserInputError(
            f"advantage {float(advantages[off_sampled[0]])} at position {int(off_sampled[0])}, which is not "
            "a sampled token; stable_reinforce takes non-zero advantages on sampled tokens only",
            field="loss_fn_inputs.advantages",
            datum_index=datum_index,
        )
    return {**loss_fn_inputs, "logprobs": logprobs, "sampled_mask": mask}
