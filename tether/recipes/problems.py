"""Where RL prompts come from: a built-in environment or a JSONL dataset, behind one small interface.

A problem source is index-deterministic (`train_problem(i)` is the same in every run), so GRPO's
resume trains exactly the prompts the interrupted run had not reached yet.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from tether.recipes.addition import Problem
from tether.recipes.conversations import load_jsonl
from tether.renderers.base import validate_messages
from tether.types.errors import UserInputError


class ProblemSource(Protocol):
    def train_problem(self, index: int) -> Problem: ...

    def heldout_problems(self) -> list[Problem]: ...


class DatasetProblems:
    """Problems from rows `{"messages": [...], "answer": "..."}`; `test_size` rows are held out."""

    def __init__(self, rows: Sequence[Problem], *, test_size: int = 0, seed: int = 0) -> None:
        if test_size >= len(rows):
            raise UserInputError(f"is {test_size} but the dataset has {len(rows)} rows", field="test_size")
        order = list(range(len(rows)))
        random.Random(f"split:{seed}").shuffle(order)
        self._heldout = [rows[i] for i in sorted(order[:test_size])]
        self._train = [rows[i] for i in sorted(order[test_size:])]
        self._seed = seed

    @classmethod
    def from_jsonl(cls, path: str | Path, *, test_size: int = 0, seed: int = 0) -> DatasetProblems:
        problems = []
        for index, row in enumerate(load_jsonl(path, field="dataset_path")):
            answer = row.get("answer")
            if not isinstance(answer, str | int | float):
                raise UserInputError(
                    "needs an 'answer' (string or number)", field="dataset_path", datum_index=index
                )
            try:
                messages = validate_messages(row.get("messages"))
            except UserInputError as exc:
                raise UserInputError(exc.message, field="dataset_path", datum_index=index) from None
            problems.append(Problem(messages=messages, answer=str(answer)))
        return cls(problems, test_size=test_size, seed=seed)

    def train_problem(self, index: int) -> Problem:
        epoch, position = divmod(index, len(self._train))
        order = list(range(len(self._train)))
        random.Random(f"{self._seed}:{epoch}").shuffle(order)
        return self._train[order[position]]

    def heldout_problems(self) -> list[Problem]:
        return list(self._heldout)
