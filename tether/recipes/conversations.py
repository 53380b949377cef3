"""Conversations from JSONL files (`{"messages": [...]}` per line) and their training datums."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tether.client.datum_helpers import datum_from_model_input_weights
from tether.renderers.base import Message, Renderer, TrainOnWhat, validate_messages
from tether.types.data import Datum
from tether.types.errors import UserInputError


def load_jsonl(path: str | Path, *, field: str) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a bad line raises naming the file and the line's index."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"no such file: {path}", field=field)
    rows = []
    for index, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(
                f"{path} line {index + 1} is not JSON: {exc.msg}", field=field, datum_index=index
            ) from None
        if not isinstance(row, dict):
            raise UserInputError(
                f"{path} line {index + 1} is not a JSON object", field=field, datum_index=index
            )
        rows.append(row)
    return rows


def load_conversations(path: str | Path, *, field: str = "dataset_path") -> list[list[Message]]:
    """Every line's `messages`, checked up front so a bad row fails before training starts."""
    conversations = []
    for index, row in enumerate(load_jsonl(path, field=field)):
        try:
            conversations.append(validate_messages(row.get("messages"), field_name="messages"))
        except UserInputError as exc:
            raise UserInputError(f"{path}: {exc.message}", field=field, datum_index=index) from None
    return conversations


def conversation_datum(
    renderer: Renderer,
    messages: list[Message],
    train_on_what: TrainOnWhat | str,
    max_length: int | None,
    *,
    reduction: str = "mean",
) -> Datum:
    """The next-token datum of one conversation; "mean" makes each example's weights sum to 1."""
    model_input, weights = renderer.build_supervised_example(messages, train_on_what)
    return datum_from_model_input_weights(model_input, weights, max_length=max_length, reduction=reduction)  # type: ignore[arg-type]
