"""FutureStore: failed operations release their data; ids of an earlier server run are reported lost."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import weakref

import numpy as np
import pytest

from tether.server.futures import FutureStore, instance_of_request_id, set_current_instance_id
from tether.server.operations import new_request_id
from tether.types.errors import NotFoundError, UserInputError


class _Big:
    def __init__(self) -> None:
        self.data = np.zeros(1 << 20, np.float32)


def _fail_holding_data(future: concurrent.futures.Future) -> weakref.ref:
    def operation():
        big = _Big()  # noqa: F841 - held by this frame, which the traceback keeps alive
        raise UserInputError("bad datum", field="loss_fn_inputs.weights", datum_index=0)

    try:
        operation()
    except UserInputError as exc:
        tb = exc.__traceback__
        ref = weakref.ref(tb.tb_next.tb_frame.f_locals["big"])
        future.set_exception(exc)
        del exc, tb
    return ref


def test_a_failed_operation_frees_its_data_when_it_fails_not_when_the_result_expires():
    store = FutureStore()
    future: concurrent.futures.Future = concurrent.futures.Future()
    store.add("r1", "alice", future)
    ref = _fail_holding_data(future)
    del future
    gc.collect()
    assert ref() is None
    outcome = asyncio.run(store.wait("r1", "alice", 1))
    assert outcome.failed and "datum 0" in outcome.payload["error"] and outcome.payload["category"] == "user"


def test_request_ids_carry_the_instance_and_an_earlier_instance_is_reported_as_a_restart():
    earlier, now = FutureStore(instance_id="0badc0de"), FutureStore(instance_id="feedf00d")
    token = set_current_instance_id(earlier.instance_id)
    try:
        request_id = new_request_id("fwdbwd")
    finally:
        from tether.server.futures import reset_current_instance_id

        reset_current_instance_id(token)
    assert instance_of_request_id(request_id) == "0badc0de"
    outcome = asyncio.run(now.wait(request_id, "alice", 1))
    assert outcome.failed and outcome.payload["category"] == "server"
    assert "restarted" in outcome.payload["error"] and "0badc0de" in outcome.payload["error"]
    with pytest.raises(NotFoundError):  # an id of this instance that is unknown stays "unknown"
        asyncio.run(now.wait("fwdbwd-feedf00d-0123456789abcdef0123", "alice", 1))
    with pytest.raises(NotFoundError):  # ids without an instance (older servers) too
        asyncio.run(now.wait("fwdbwd-0123456789abcdef0123", "alice", 1))
