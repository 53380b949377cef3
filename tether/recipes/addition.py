"""The quickstart's task: addition written as chat ("3+7+1+9" -> "20", or "12+34" -> "46").

Problems are a pure function of (seed, index), so a run and its resume see the same ones. The
held-out problems are drawn from their own stream and never appear in training. The reward is 1
for exactly the right number in a cleanly ended response, else 0.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from tether.renderers.base import Message, ParseTermination
from tether.types.errors import UserInputError


@dataclass(frozen=True)
class Problem:
    """A prompt (as messages) and the exact answer expected."""

    messages: list[Message]
    answer: str


def exact_answer_reward(response: Message, termination: ParseTermination, answer: str) -> float:
    """1.0 when the response ended cleanly and its content is exactly `answer` (spaces ignored)."""
    return 1.0 if termination.is_clean and response["content"].strip() == answer else 0.0


class AdditionTask:
    """Sums of `num_operands` numbers of up to `num_digits` digits ("3+7+1+9" -> "20").

    Held-out problems are whole multisets of operands: if "3+7+1+9" is held out, so is every
    reordering of it, so held-out accuracy measures adding unseen combinations, not recall.
    """

    def __init__(
        self, num_operands: int = 4, num_digits: int = 1, seed: int = 0, num_heldout: int = 100
    ) -> None:
        if num_operands < 2:
            raise UserInputError(f"must be >= 2, got {num_operands}", field="num_operands")
        if num_digits < 1:
            raise UserInputError(f"must be >= 1, got {num_digits}", field="num_digits")
        self.num_operands = num_operands
        self.num_digits = num_digits
        self.seed = seed
        self._limit = 10**num_digits
        num_multisets = math.comb(self._limit + num_operands - 1, num_operands)
        if num_heldout > num_multisets // 2:
            raise UserInputError(
                f"is {num_heldout}, but only {num_multisets} distinct problems exist; hold out at most half",
                field="num_heldout",
            )
        rng = random.Random(f"heldout:{seed}:{num_operands}:{num_digits}")
        heldout: dict[tuple[int, ...], tuple[int, ...]] = {}
        while len(heldout) < num_heldout:
            operands = self._draw(rng)
            heldout.setdefault(tuple(sorted(operands)), operands)
        self._heldout = list(heldout.values())
        self._heldout_keys = set(heldout)

    def _draw(self, rng: random.Random) -> tuple[int, ...]:
        return tuple(rng.randrange(self._limit) for _ in range(self.num_operands))

    @staticmethod
    def problem_for(operands: tuple[int, ...]) -> Problem:
        content = "+".join(str(x) for x in operands)
        return Problem(messages=[{"role": "user", "content": content}], answer=str(sum(operands)))

    def train_problem(self, index: int) -> Problem:
        """Training problem number `index` (never a reordering of a held-out one)."""
        rng = random.Random(f"train:{self.seed}:{self.num_operands}:{self.num_digits}:{index}")
        while True:
            operands = self._draw(rng)
            if tuple(sorted(operands)) not in self._heldout_keys:
                return self.problem_for(operands)

    def heldout_problems(self) -> list[Problem]:
        return [self.problem_for(operands) for operands in self._heldout]

    def sft_conversation(self, index: int) -> list[Message]:
        problem = self.train_problem(index)
        return [*problem.messages, {"role": "assistant", "content": problem.answer}]
