"""Cancelling a `Sample` op of the in-process trainer (what the service's `cancel_future` does)
cancels the request in the sampling engine: it stops generating and its KV reservation is freed.

Synchronisation: the engine's token callback holds generation until the engine's future is
cancelled, so the op is certainly running when the test cancels it; then the test waits on the
engine's stats. No sleeps.
"""

from __future__ import annotations

import threading

import pytest

from tether.trainer.config import EngineSettings
from tether.trainer.local import InProcessTrainer
from tether.types import ops
from tether.types.wire import SamplingParams

BASE = "tether/tiny-qwen3"
WAIT_S = 60


def sample(max_tokens: int) -> ops.Sample:
    return ops.Sample(
        sampler_id=None,
        prompt_tokens=[5, 6, 7],
        num_samples=1,
        sampling_params=SamplingParams(max_tokens=max_tokens, seed=1, stop=[]),
    )


@pytest.fixture()
def trainer(tmp_path, default_model_dir):
    trainer = InProcessTrainer(
        BASE, EngineSettings(data_dir=tmp_path, device="cpu", dtype="float32", torch_threads=1)
    )
    yield trainer
    trainer.close()


def hold_generation(engine, monkeypatch, at: int) -> threading.Event:
    """The next request stops in its `at`-th token callback until its engine future is cancelled;
    returns the event set when generation is held there."""
    held = threading.Event()
    real_submit = engine.submit

    def submit(request, on_token=None):
        cancelled = threading.Event()
        count = 0

        def hold(*token) -> None:
            nonlocal count
            count += 1
            if count == at:
                held.set()
                cancelled.wait(WAIT_S)  # never cancelled: the request runs on and the test fails

        future = real_submit(request, on_token=hold)
        future.add_done_callback(lambda f: f.cancelled() and cancelled.set())
        return future

    monkeypatch.setattr(engine, "submit", submit)
    return held


def test_cancelling_a_running_sample_op_cancels_it_in_the_engine(trainer, monkeypatch):
    assert len(trainer.submit(sample(3)).result(timeout=WAIT_S).sequences[0].tokens) == 3
    engine = trainer.executor.sampling
    held = hold_generation(engine, monkeypatch, at=2)
    future = trainer.submit(sample(100))
    assert held.wait(WAIT_S)
    assert future.cancel() and future.cancelled()
    stats = engine.wait_for_stats(
        lambda s: s.cancelled == 1 and s.running_sequences == 0 and s.reserved_tokens == 0, WAIT_S
    )
    assert (stats.completed, stats.failed) == (1, 0)
    monkeypatch.undo()
    assert len(trainer.submit(sample(4)).result(timeout=WAIT_S).sequences[0].tokens) == 4


def test_cancelling_the_first_sample_op_while_the_engine_is_built_cancels_it_too(trainer, monkeypatch):
    """The first `Sample` builds the engine on a pool thread (`_flatten`); cancelling it still
    reaches the engine once the request is there."""
    from tether.trainer import executor as executor_module

    built = threading.Event()
    real_sampling = executor_module.OpExecutor.sampling

    def sampling(self):
        engine = real_sampling.fget(self)
        if not built.is_set():
            built.set()
            self.held = hold_generation(engine, monkeypatch, at=2)
        return engine

    monkeypatch.setattr(executor_module.OpExecutor, "sampling", property(sampling))
    future = trainer.submit(sample(100))
    assert built.wait(WAIT_S) and trainer.executor.held.wait(WAIT_S)
    assert future.cancel()
    stats = trainer.executor.sampling.wait_for_stats(
        lambda s: s.cancelled == 1 and s.running_sequences == 0 and s.reserved_tokens == 0, WAIT_S
    )
    assert (stats.completed, stats.failed) == (0, 0)
