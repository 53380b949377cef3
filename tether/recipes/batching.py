"""Which examples make up each training step, as a pure function of the step number.

The order is a per-epoch permutation drawn from `seed` and the epoch number, so step N's batch is
the same in every run and after every resume: resuming at step N trains exactly batch N, with no
batch replayed or skipped. An incomplete last batch of an epoch is dropped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tether.types.errors import UserInputError


@dataclass(frozen=True)
class BatchPlan:
    num_examples: int
    batch_size: int
    num_epochs: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserInputError(f"must be >= 1, got {self.batch_size}", field="batch_size")
        if self.num_epochs < 1:
            raise UserInputError(f"must be >= 1, got {self.num_epochs}", field="num_epochs")
        if self.num_examples < self.batch_size:
            raise UserInputError(
                f"is {self.batch_size} but the dataset has only {self.num_examples} training examples",
                field="batch_size",
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    @property
    def total_steps(self) -> int:
        return self.batches_per_epoch * self.num_epochs

    def epoch_of(self, step: int) -> int:
        return step // self.batches_per_epoch

    def indices(self, step: int) -> list[int]:
        """Dataset indices of the batch trained at `step` (0-based)."""
        if not 0 <= step < self.total_steps:
            raise UserInputError(f"must be in [0, {self.total_steps}), got {step}", field="step")
        epoch, position = divmod(step, self.batches_per_epoch)
        order = list(range(self.num_examples))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        start = position * self.batch_size
        return order[start : start + self.batch_size]
