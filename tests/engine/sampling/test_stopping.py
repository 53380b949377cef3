"""Stop conditions: token ids, strings decoded from the tail of the generation, EOS rules."""

from __future__ import annotations

import pytest

from tether.engine.sampling.stopping import StopCondition
from tether.types.errors import UserInputError
from tether.types.sample_request import ModelLimits, normalize_stop

LIMITS = ModelLimits(vocab_size=264, max_context_length=64, eos_token_ids=(256,))


def byte_decode(ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_none_keeps_eos_and_empty_list_disables_every_stop():
    assert normalize_stop(None, LIMITS).token_ids == {256}
    empty = normalize_stop([], LIMITS)
    assert empty.token_ids == frozenset() and empty.strings == ()
    assert not StopCondition(empty, None).is_met([256])


def test_token_ids_and_strings_keep_eos():
    assert normalize_stop([10, 11], LIMITS).token_ids == {10, 11, 256}
    spec = normalize_stop("\n\nUser:", LIMITS)
    assert spec.strings == ("\n\nUser:",) and spec.token_ids == {256}


def test_string_stop_fires_on_the_token_that_completes_it():
    condition = StopCondition(normalize_stop(["User:"], LIMITS), byte_decode)
    generated = list(b"hello\n\nUser")
    assert not condition.is_met(generated)
    assert condition.is_met(generated + [ord(":")])


def test_string_stop_spanning_multibyte_characters():
    condition = StopCondition(normalize_stop(["é!"], LIMITS), byte_decode)
    text = "café".encode()
    assert not condition.is_met(list(text))
    assert condition.is_met(list(text) + [ord("!")])


def test_bad_stops_are_user_errors():
    for bad in ([1, "a"], [""], [300]):
        with pytest.raises(UserInputError) as err:
            normalize_stop(bad, LIMITS)
        assert err.value.field == "stop"
