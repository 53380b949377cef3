"""Cancelling sampling requests: queued or running, their KV rows and reservation go back to the
pool, their batch-mates' output is what it would have been, and a finished request stays finished.

Synchronisation is by events set from the engine's own callbacks (a request's `on_token` may block
the engine's thread until the test has acted) and by `wait_for_stats`; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from tether.engine.sampling import SampleRequest, SamplingEngine
from tether.engine.sampling import engine as engine_module

WAIT_S = 60
LONG = list(b"The quick brown fox jumps")
SHORT = list(b"Hello there")


def sampled(prompt, **kwargs) -> SampleRequest:
    return SampleRequest(prompt, **{"temperature": 1.0, "stop": [], "seed": 5, "max_tokens": 20, **kwargs})


class Hold:
    """An `on_token` that counts tokens and, at token number `at` (over all samples), stops the
    engine's thread until `release` is set."""

    def __init__(self, at: int | None = None) -> None:
        self.at = at
        self.count = 0
        self.reached = threading.Event()
        self.release = threading.Event()

    def __call__(self, sample: int, token: int, logprob: float, topk) -> None:
        self.count += 1
        if self.count == self.at:
            self.reached.set()
            assert self.release.wait(WAIT_S), "the test never released the engine"

    def wait(self) -> None:
        assert self.reached.wait(WAIT_S), "the held token never came"


def idle(engine: SamplingEngine, *, cancelled: int):
    return engine.wait_for_stats(
        lambda s: s.cancelled == cancelled and s.running_sequences == 0 and s.waiting_requests == 0, WAIT_S
    )


def test_a_queued_request_cancelled_never_runs_and_frees_its_queue_slot(base):
    engine = SamplingEngine(base, kv_cache_budget_tokens=100, max_waiting_requests=1)
    try:
        hold = Hold(at=1)
        first = engine.submit(sampled(LONG, max_tokens=70), on_token=hold)  # reserves 95 of 100
        hold.wait()  # the engine is inside `first`'s first token: `queued` cannot be admitted
        never = Hold()
        queued = engine.submit(sampled(SHORT, max_tokens=20), on_token=never)
        assert engine.cancel(queued) and queued.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            queued.result(timeout=0)
        hold.release.set()
        stats = engine.wait_for_stats(lambda s: s.cancelled == 1 and s.waiting_requests == 0, WAIT_S)
        assert stats.failed == 0
        assert len(first.result(timeout=WAIT_S).sequences[0].tokens) == 70
        stats = idle(engine, cancelled=1)
        assert (stats.completed, stats.failed, stats.reserved_tokens) == (1, 0, 0)
        assert never.count == 0
    finally:
        engine.close()


def test_a_cancelled_running_request_gives_its_place_to_a_waiting_one(base):
    engine = SamplingEngine(base, kv_cache_budget_tokens=100)
    try:
        hold = Hold(at=2)
        running = engine.submit(sampled(LONG, max_tokens=70), on_token=hold)  # reserves 95 of 100
        hold.wait()
        waiting = engine.submit(sampled(SHORT, max_tokens=20))  # needs 31: waits for the KV budget
        assert engine.stats().waiting_requests == 1
        assert engine.cancel(running)
        hold.release.set()
        assert len(waiting.result(timeout=WAIT_S).sequences[0].tokens) == 20
        assert hold.count == 2  # it ran in the cancelled request's place, not after its 70 tokens
        stats = idle(engine, cancelled=1)
        assert (stats.completed, stats.reserved_tokens) == (1, 0)
    finally:
        engine.close()


def test_cancelling_mid_generation_frees_its_kv_rows_and_leaves_batch_mates_unchanged(engine):
    mate = sampled(SHORT, num_samples=2, max_tokens=24, seed=11)
    alone = engine.submit(mate).result(timeout=WAIT_S)
    # Block the engine on a one-token request so the victim and its mate are admitted together.
    gate = Hold(at=1)
    blocker = engine.submit(sampled(SHORT, max_tokens=1), on_token=gate)
    gate.wait()
    victim_tokens = Hold(at=4)
    victim = engine.submit(sampled(LONG, num_samples=2, max_tokens=60, seed=3), on_token=victim_tokens)
    crowded = engine.submit(mate)
    gate.release.set()
    victim_tokens.wait()  # 4 tokens in (two steps of two samples), the mate decoding alongside
    assert engine.stats().running_sequences == 4
    assert engine.cancel(victim) and victim.cancelled()
    victim_tokens.release.set()
    stats = engine.wait_for_stats(lambda s: s.cancelled == 1, WAIT_S)
    assert stats.reserved_tokens <= 2 * (len(SHORT) + 24)  # only the mate's reservation is left
    result = crowded.result(timeout=WAIT_S)
    assert [s.tokens for s in result.sequences] == [s.tokens for s in alone.sequences]
    for got, want in zip(result.sequences, alone.sequences, strict=True):
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert victim_tokens.count == 4  # nothing generated for it after the step it was cancelled in
    stats = idle(engine, cancelled=1)
    assert (stats.completed, stats.failed, stats.reserved_tokens) == (3, 0, 0)
    blocker.result(timeout=0)


def test_cancel_after_finish_is_a_no_op(engine):
    future = engine.submit(sampled(SHORT, max_tokens=5))
    result = future.result(timeout=WAIT_S)
    assert engine.cancel(future) is False
    assert not future.cancelled() and future.result() is result
    stats = engine.stats()
    assert (stats.completed, stats.cancelled, stats.failed) == (1, 0, 0)


def test_a_request_cancelled_during_its_prefill_is_dropped_and_its_prompt_stays_reusable(engine, monkeypatch):
    prompt = list(b"a different prompt")
    real_prefill = engine_module.prefill_batch
    submitted: list[concurrent.futures.Future] = []
    armed = threading.Event()

    def cancel_then_prefill(model, prompts):
        if any(list(p.tokens) == prompt for p in prompts):
            assert armed.wait(WAIT_S)
            submitted[0].cancel()
        return real_prefill(model, prompts)

    monkeypatch.setattr(engine_module, "prefill_batch", cancel_then_prefill)
    tokens = Hold()
    submitted.append(engine.submit(sampled(prompt, max_tokens=40), on_token=tokens))
    armed.set()
    assert idle(engine, cancelled=1).failed == 0
    assert tokens.count <= 1  # at most the token sampled from its prefill
    # Its prefill was cached: the same prompt reuses it and samples what a fresh prefill would.
    again = engine.submit(sampled(prompt, max_tokens=40)).result(timeout=WAIT_S)
    monkeypatch.setattr(engine_module, "prefill_batch", real_prefill)
    fresh = SamplingEngine(engine._base, prompt_cache_tokens=None)
    try:
        reference = fresh.submit(sampled(prompt, max_tokens=40)).result(timeout=WAIT_S)
    finally:
        fresh.close()
    assert again.prompt_cache_hit_tokens == len(prompt)
    assert again.sequences[0].tokens == reference.sequences[0].tokens


class Counting:
    """An `on_token` that, at the second token, tells the event loop and waits until `future` is
    cancelled (so the request is certainly running when its awaiting task is cancelled)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, second_token: asyncio.Event) -> None:
        self.loop, self.second_token = loop, second_token
        self.count = 0
        self.cancelled = threading.Event()

    def __call__(self, sample: int, token: int, logprob: float, topk) -> None:
        self.count += 1
        if self.count == 2:
            self.loop.call_soon_threadsafe(self.second_token.set)
            assert self.cancelled.wait(WAIT_S), "the request was never cancelled"


def test_cancelling_the_task_that_awaits_a_request_cancels_the_request(engine):
    async def scenario() -> None:
        second_token = asyncio.Event()
        on_token = Counting(asyncio.get_running_loop(), second_token)
        future = engine.submit(sampled(LONG, max_tokens=60), on_token=on_token)
        future.add_done_callback(lambda f: f.cancelled() and on_token.cancelled.set())

        async def handler():  # what a route does: await the engine's future
            return await asyncio.wrap_future(future)

        task = asyncio.create_task(handler())
        await second_token.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert future.cancelled()

    asyncio.run(scenario())
    stats = idle(engine, cancelled=1)
    assert (stats.completed, stats.failed, stats.reserved_tokens) == (0, 0, 0)
    assert engine._groups == {}  # white-box: its KV buffers went before it was counted


def test_close_after_cancels_settles_everything_once(base):
    engine = SamplingEngine(base, kv_cache_budget_tokens=100)
    hold = Hold(at=2)
    running = engine.submit(sampled(LONG, max_tokens=70), on_token=hold)
    hold.wait()
    queued = engine.submit(sampled(SHORT, max_tokens=20))
    assert engine.cancel(running) and engine.cancel(queued)
    hold.release.set()
    engine.close()
    stats = engine.stats()
    assert (stats.cancelled, stats.failed, stats.completed) == (2, 0, 0)
    assert (stats.running_sequences, stats.reserved_tokens, stats.waiting_requests) == (0, 0, 0)
