"""Idempotent submission with bounded memory (tether.server.dedupe)."""

from __future__ import annotations

import pytest

from tether.server.dedupe import DedupeRegistry
from tether.types.errors import ConflictError


def test_release_and_forget():
    reg = DedupeRegistry()
    assert reg.claim("s", 0, "r0") is None
    assert reg.claim("s", 0, "r1") == "r0"
    reg.release("s", 0)
    assert reg.claim("s", 0, "r2") is None
    reg.forget_stream("s")
    assert reg.claim("s", 0, "r3") is None


def test_memory_is_flat_over_a_long_run():
    """100,000 sample calls on one session: the registry never holds more than its window."""
    reg = DedupeRegistry(window=256)
    sizes = set()
    for seq in range(100_000):
        assert reg.claim("sampler-1", seq, f"r{seq}") is None
        if seq % 1000 == 999:
            sizes.add(reg.size())
    assert sizes == {256}
    assert reg.claim("sampler-1", 99_999, "again") == "r99999"  # a recent retry is still recognised


def test_a_retry_older_than_the_window_is_refused_not_rerun():
    reg = DedupeRegistry(window=4)
    for seq in range(10):
        reg.claim("m", seq, f"r{seq}")
    with pytest.raises(ConflictError):
        reg.claim("m", 2, "late")
    assert reg.claim("m", 10, "r10") is None


def test_streams_are_independent():
    reg = DedupeRegistry(window=2)
    reg.claim("a", 1, "a1")
    for seq in range(5):
        reg.claim("b", seq, f"b{seq}")
    assert reg.claim("a", 1, "again") == "a1"
