"""Decide, after each generated token, whether a sequence has reached one of its stops.

Token stops are a set lookup. String stops decode only the tail of the generated tokens that could
hold the string (its UTF-8 length in tokens plus a margin, since every token decodes to at least one
byte), so the check stays cheap for long generations. Generation stops at the first token that
completes a stop string; that token and the ones before it are kept.

This module knows nothing about models or batching.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tether.types.sample_request import StopSpec

Decode = Callable[[Sequence[int]], str]


class StopCondition:
    """The stops of one request, checked against a sequence's generated tokens."""

    def __init__(self, spec: StopSpec, decode: Decode | None) -> None:
        if spec.strings and decode is None:
            raise ValueError("stop strings need a decode function")
        self._token_ids = spec.token_ids
        self._strings = spec.strings
        self._decode = decode
        self._window = max((len(s.encode("utf-8")) for s in spec.strings), default=0) + 4

    def is_met(self, generated: Sequence[int]) -> bool:
        """Whether the last token of `generated` ends the sequence."""
        if not generated:
            return False
        if generated[-1] in self._token_ids:
            return True
        if not self._strings:
            return False
        tail = self._decode(generated[-self._window :])  # type: ignore[misc]
        return any(s in tail for s in self._strings)
