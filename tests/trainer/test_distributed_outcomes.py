"""How the ranks' outcomes of one op become its answer (`run_everywhere`), with the other ranks' outcomes given."""

from __future__ import annotations

import pytest

from tether.trainer.distributed import RanksDisagree, run_everywhere
from tether.types import ops
from tether.types.errors import ServerError, UserInputError
from tether.types.wire import AdamParams


class _Executor:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def execute(self, op):
        if self.error is not None:
            raise self.error
        return ops.Done()


class _Channel:
    """Stands for the all-gather: this rank's status is replaced by the given list's first entry."""

    def __init__(self, others: list[str]) -> None:
        self.others = others
        self.sent: list[str] = []

    def statuses(self, error: str) -> list[str]:
        self.sent.append(error)
        return [error, *self.others]


STEP = ops.OptimStep(model_id="m", adam_params=AdamParams())
SAVE = ops.SaveState(model_id="m", owner="o", path="tinker://m/weights/x")


def test_all_ranks_succeed_gives_rank_zeros_result():
    assert run_everywhere(_Executor(), _Channel([""]), STEP) == ops.Done()


def test_the_same_error_everywhere_is_rank_zeros_own():
    channel = _Channel(["UserInputError: bad"])
    with pytest.raises(UserInputError, match="bad"):
        run_everywhere(_Executor(UserInputError("bad", field="x")), channel, STEP)
    assert channel.sent[0].startswith("UserInputError")  # what the other ranks see


def test_another_rank_failing_a_read_only_op_fails_it_naming_the_rank():
    with pytest.raises(ServerError, match="rank 1: RuntimeError: disk full"):
        run_everywhere(_Executor(), _Channel(["RuntimeError: disk full"]), SAVE)


def test_some_ranks_failing_a_state_change_stops_the_trainer():
    with pytest.raises(
        RanksDisagree, match=r"OptimStep failed on some ranks only \(rank 1: OutOfMemoryError"
    ):
        run_everywhere(_Executor(), _Channel(["OutOfMemoryError: CUDA out of memory"]), STEP)
    with pytest.raises(RanksDisagree, match="rank 0: RuntimeError: x"):
        run_everywhere(_Executor(RuntimeError("x")), _Channel([""]), STEP)
