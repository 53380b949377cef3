"""The quickstart's task: add two N-digit numbers, asked and answered as chat ("12+34" -> "46").

Problems are a pure function of (seed, index), so a run and its resume see the same ones. The
held-out problems are drawn from their own stream and never appear in training. The reward is 1
for exactly the right number in a cleanly ended response, else 0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tether.renderers.base import Message, ParseTermination


@dataclass(frozen=True)
class Problem:
    """A prompt (as messages) and the exact answer expected."""

    messages: list[Message]
    answer: str


def exact_answer_reward(response: Message, termination: ParseTermination, answer: str) -> float:
    """1.0 when the response ended cleanly and its content is exactly `answer` (spaces ignored)."""
    return 1.0 if termination.is_clean and response["content"].strip() == answer else 0.0


class AdditionTask:
    """Addition of two `num_digits`-digit (at most) numbers, with a disjoint held-out set."""

    def __init__(self, num_digits: int = 2, seed: int = 0, num_heldout: int = 100) -> None:
        self.num_digits = num_digits
        self.seed = seed
        self._limit = 10**num_digits
        heldout_rng = random.Random(f"heldout:{seed}:{num_digits}")
        pairs: dict[tuple[int, int], None] = {}
        while len(pairs) < min(num_heldout, self._limit**2 // 4):
            pairs[(heldout_rng.randrange(self._limit), heldout_rng.randrange(self._limit))] = None
        self._heldout_pairs = list(pairs)
        self._heldout_set = set(pairs)

    @staticmethod
    def problem_for(a: int, b: int) -> Problem:
        return Problem(messages=[{"role": "user", "content": f"{a}+{b}"}], answer=str(a + b))

    def train_problem(self, index: int) -> Problem:
        """Training problem number `index` (never a held-out one)."""
        rng = random.Random(f"train:{self.seed}:{self.num_digits}:{index}")
        while True:
            pair = (rng.randrange(self._limit), rng.randrange(self._limit))
            if pair not in self._heldout_set:
                return self.problem_for(*pair)

    def heldout_problems(self) -> list[Problem]:
        return [self.problem_for(a, b) for a, b in self._heldout_pairs]

    def sft_conversation(self, index: int) -> list[Message]:
        problem = self.train_problem(index)
        return [*problem.messages, {"role": "assistant", "content": problem.answer}]
