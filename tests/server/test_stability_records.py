"""The stability records kept for stable_reinforce: session scope, expiry and a bounded size."""

from __future__ import annotations

import numpy as np

from tether.server.stability import StabilityRecords


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def keep(records: StabilityRecords, request_id: str, *, session: str = "s1", n: int = 2) -> None:
    records.record(
        request_id,
        owner="alice",
        session_id=session,
        prompt=[1, 2, 3],
        sequences=[([4 + i, 5 + i], [-0.25 * i, -1.0]) for i in range(n)],
    )


def test_a_sequence_is_found_by_its_id_in_its_own_session_only():
    records = StabilityRecords()
    keep(records, "req-a")
    found = records.lookup("alice", "s1")("req-a:1")
    assert found is not None
    np.testing.assert_array_equal(found.prompt, [1, 2, 3])
    np.testing.assert_array_equal(found.tokens, [5, 6])
    np.testing.assert_array_equal(found.logprobs, np.array([-0.25, -1.0], np.float32))
    assert records.lookup("alice", "s1")("req-a:2") is None  # only two sequences
    assert records.lookup("alice", "s1")("req-a") is None
    assert records.lookup("alice", "s2")("req-a:0") is None  # another session
    assert records.lookup("bob", "s1")("req-a:0") is None  # another owner
    records.forget_session("s1")
    assert records.lookup("alice", "s1")("req-a:0") is None and records.tokens == 0


def test_records_expire_a_ttl_after_their_last_use():
    clock = Clock()
    records = StabilityRecords(ttl_s=100.0, clock=clock)
    keep(records, "req-a")
    keep(records, "req-b")
    clock.now = 90.0
    assert records.lookup("alice", "s1")("req-a:0") is not None  # using it restarts its ttl
    clock.now = 150.0
    assert records.lookup("alice", "s1")("req-b:0") is None
    assert records.lookup("alice", "s1")("req-a:0") is not None
    assert len(records) == 1


def test_the_store_drops_the_least_recently_used_beyond_its_token_budget():
    records = StabilityRecords(max_tokens=20)  # each request holds 3 + 2 * 2 = 7 tokens
    for name in ("a", "b"):
        keep(records, name)
    assert records.lookup("alice", "s1")("a:0") is not None  # a is now the most recently used
    keep(records, "c")  # 21 tokens: the least recently used (b) goes
    lookup = records.lookup("alice", "s1")
    assert lookup("b:0") is None and lookup("a:0") is not None and lookup("c:0") is not None
    assert records.tokens == 14
    for i in range(100):  # memory stays bounded over any run
        keep(records, f"r{i}")
    assert records.tokens <= 20
