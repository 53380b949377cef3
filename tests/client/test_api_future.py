"""APIFuture: results, await, callbacks, and the logging of failures nobody retrieved."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging

import pytest

from tether.client import event_loop
from tether.client.api_future import APIFuture
from tether.types.errors import UserInputError


async def _fail() -> None:
    await asyncio.sleep(0.01)
    raise UserInputError("bad weights", field="weights", datum_index=3)


async def _value() -> int:
    await asyncio.sleep(0.01)
    return 42


def test_result_await_and_callbacks() -> None:
    fut: APIFuture[int] = APIFuture(event_loop.submit(_value()), "value")
    seen = []
    fut.add_done_callback(lambda f: seen.append(f.result()))
    assert fut.result(timeout=5) == 42
    assert asyncio.run(_await(APIFuture(event_loop.submit(_value())))) == 42
    concurrent.futures.wait([fut.future()])
    assert seen == [42]


async def _await(fut: APIFuture[int]) -> int:
    return await fut


def test_unretrieved_failure_is_logged_when_collected(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="tether.client")
    fut = APIFuture(event_loop.submit(_fail()), "forward_backward")
    concurrent.futures.wait([fut._cf])
    del fut
    gc.collect()
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "forward_backward failed and its error was never retrieved" in m and "bad weights" in m
        for m in messages
    )


def test_failure_of_future_dropped_while_pending_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="tether.client")
    cf = event_loop.submit(_fail())
    APIFuture(cf, "optim_step")  # dropped at once, before it fails
    gc.collect()
    concurrent.futures.wait([cf])
    event_loop.run_sync(asyncio.sleep(0.01))  # let done callbacks run
    assert any("optim_step failed" in r.getMessage() for r in caplog.records)


def test_retrieved_failure_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="tether.client")
    fut = APIFuture(event_loop.submit(_fail()), "sample")
    with pytest.raises(UserInputError) as info:
        fut.result(timeout=5)
    assert info.value.field == "weights" and info.value.datum_index == 3
    del fut
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
