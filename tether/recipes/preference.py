"""Preference pairs from JSONL and their DPO datums.

A line holds one pair, in either of two shapes (as TRL and the cookbook's JSONL builder accept):

- `{"chosen": [messages...], "rejected": [messages...]}`: two whole conversations that share every
  message but the last, which is the assistant's answer;
- `{"prompt": [messages...], "chosen": {message} | [message], "rejected": {message} | [message]}`:
  the shared prompt once, and one assistant message per side.

Everything is checked before training starts: a line that is not JSON, a missing or malformed
side, a last message that is not the assistant's, or two sides whose prompts differ raise a
UserInputError naming the file and line (`datum_index` is the 0-based line index). This module
knows nothing of clients or losses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tether.client.datum_helpers import datum_from_model_input_weights
from tether.renderers.base import Message, Renderer, TrainOnWhat, validate_messages
from tether.types.data import Datum
from tether.types.errors import UserInputError


@dataclass(frozen=True)
class PreferencePair:
    """A prompt and two assistant answers to it, the first preferred; `line` is 1-based (0: built in code)."""

    prompt: list[Message]
    chosen: Message
    rejected: Message
    line: int = 0


def _line_error(path: Path, line: int, message: str, field: str) -> UserInputError:
    return UserInputError(f"{path} line {line}: {message}", field=field, datum_index=line - 1)


def _completion(value: Any, side: str) -> Message:
    messages = [value] if isinstance(value, dict) else value
    if not isinstance(messages, list) or len(messages) != 1:
        raise UserInputError("must be one assistant message (a dict, or a list of one)", field=side)
    return validate_messages(messages, field_name=side)[0]


def pair_from_row(row: dict[str, Any], line: int = 0) -> PreferencePair:
    """A checked pair from one JSON object; UserInputError names the offending key."""
    if "chosen" not in row or "rejected" not in row:
        raise UserInputError("needs 'chosen' and 'rejected'", field="chosen")
    if "prompt" in row:
        prompt = validate_messages(row["prompt"], field_name="prompt")
        chosen, rejected = _completion(row["chosen"], "chosen"), _completion(row["rejected"], "rejected")
    else:
        chosen_conv = validate_messages(row["chosen"], field_name="chosen")
        rejected_conv = validate_messages(row["rejected"], field_name="rejected")
        for side, conv in (("chosen", chosen_conv), ("rejected", rejected_conv)):
            if not conv:
                raise UserInputError("is an empty conversation", field=side)
        if chosen_conv[:-1] != rejected_conv[:-1]:
            raise UserInputError(
                "chosen and rejected must share every message but the last (their prompts differ)",
                field="rejected",
            )
        prompt, chosen, rejected = list(chosen_conv[:-1]), chosen_conv[-1], rejected_conv[-1]
    for side, message in (("chosen", chosen), ("rejected", rejected)):
        if message["role"] != "assistant":
            raise UserInputError(
                f"the answer must be an assistant message, got role {message['role']!r}", field=side
            )
    return PreferencePair(prompt=list(prompt), chosen=chosen, rejected=rejected, line=line)


def load_preference_pairs(path: str | Path, *, field: str = "dataset_path") -> list[PreferencePair]:
    """Every pair of a JSONL file; the first bad line raises, naming its line number."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"no such file: {path}", field=field)
    pairs = []
    for index, text in enumerate(path.read_text().splitlines()):
        line = index + 1
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _line_error(path, line, f"not JSON ({exc.msg})", field) from None
        if not isinstance(row, dict):
            raise _line_error(path, line, "not a JSON object", field)
        try:
            pairs.append(pair_from_row(row, line))
        except UserInputError as exc:
            raise _line_error(path, line, f"{exc.field}: {exc.message}", field) from None
    if not pairs:
        raise UserInputError(f"{path} holds no preference pairs", field=field)
    return pairs


def pair_datums(renderer: Renderer, pair: PreferencePair, max_length: int | None) -> tuple[Datum, Datum]:
    """(chosen, rejected) next-token datums with weight 1 on the answer's tokens (reduction "none").

    The weighted sum of a datum's target logprobs is then log p(answer | prompt). Raises if
    `max_length` cuts an answer off entirely (its DPO term would be a constant, silently).
    """
    datums = []
    for side, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        model_input, weights = renderer.build_supervised_example(
            [*pair.prompt, answer], TrainOnWhat.LAST_ASSISTANT_MESSAGE
        )
        datum = datum_from_model_input_weights(model_input, weights, max_length=max_length, reduction="none")
        if not float(np.asarray(datum.loss_fn_inputs["weights"].to_numpy()).sum()) > 0:
            where = f"line {pair.line}" if pair.line else "a pair"
            raise UserInputError(
                f"{where}: max_length={max_length} leaves no token of the {side} answer", field="max_length"
            )
        datums.append(datum)
    return datums[0], datums[1]


def sequence_logprob(datum: Datum, logprobs: Sequence[float] | np.ndarray) -> float:
    """sum(weights * logprobs) over a datum's targets: the answer's log-probability."""
    weights = np.asarray(datum.loss_fn_inputs["weights"].to_numpy(), dtype=np.float64)
    values = np.asarray(logprobs, dtype=np.float64)
    if values.shape != weights.shape:
        raise UserInputError(
            f"has {values.shape[0]} logprobs for {weights.shape[0]} targets", field="logprobs"
        )
    return float((weights * values).sum())
