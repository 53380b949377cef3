"""tinker:// path and id parsing, checked against the official SDK's parser."""

from __future__ import annotations

import pytest
from tinker.types.checkpoint import ParsedCheckpointTinkerPath

from tether.types.errors import UserInputError
from tether.types.paths import (
    ParsedCheckpointPath,
    format_checkpoint_path,
    format_model_id,
    format_sampling_session_id,
    parse_checkpoint_id,
    parse_checkpoint_path,
    parse_model_id,
    parse_sampling_session_id,
    validate_checkpoint_name,
)


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("tinker://sess-abc:train:0/weights/ckpt1", "training"),
        ("tinker://14bdf3a1-aa:train:17/sampler_weights/step_000100", "sampler"),
        ("tinker://s:train:2/external_weights/final.v2", "external"),
    ],
)
def test_parse_agrees_with_sdk_and_round_trips(path, kind):
    parsed = parse_checkpoint_path(path)
    sdk = ParsedCheckpointTinkerPath.from_tinker_path(path)
    assert parsed.kind == sdk.checkpoint_type == kind
    assert parsed.training_run_id == sdk.training_run_id
    assert parsed.checkpoint_id == sdk.checkpoint_id
    assert parsed.tinker_path == path == str(parsed)
    assert format_checkpoint_path(parsed.training_run_id, kind, parsed.name) == path
    assert parse_checkpoint_id(parsed.checkpoint_id) == (kind, parsed.name)


@pytest.mark.parametrize(
    "path",
    [
        "s3://x/weights/a",
        "tinker://s:train:0/weights",
        "tinker://s:train:0/weights/a/b",
        "tinker://s:train:0/checkpoints/a",
        "tinker://s:train:0/weights/",
        "tinker://s:train:0/weights/..",
        "tinker://s:train:0/weights/.hidden",
        "tinker://s:train:0/weights/a..b",
        "tinker://s:train:0/weights/a b",
        "tinker://s:train:0/weights/a\\b",
        "tinker:///weights/a",
        "tinker://../weights/a",
        "tinker://s:train:0/weights/" + "a" * 201,
    ],
)
def test_malformed_paths_are_user_errors_naming_the_field(path):
    with pytest.raises(UserInputError) as err:
        parse_checkpoint_path(path)
    assert err.value.field == "path"


def test_name_validation_and_custom_field():
    assert validate_checkpoint_name("step-10_a.b") == "step-10_a.b"
    with pytest.raises(UserInputError) as err:
        validate_checkpoint_name("a/b", field="name")
    assert err.value.field == "name"
    with pytest.raises(UserInputError):
        parse_checkpoint_id("weights")
    with pytest.raises(UserInputError):
        parse_checkpoint_id("bogus/a")
    with pytest.raises(UserInputError):
        format_checkpoint_path("s:train:0", "bogus", "a")  # type: ignore[arg-type]


def test_model_and_sampling_ids():
    assert format_model_id("sess-abc", 3) == "sess-abc:train:3"
    assert parse_model_id("sess-abc:train:3") == ("sess-abc", 3)
    assert format_sampling_session_id("sess-abc", 0) == "sess-abc:sample:0"
    assert parse_sampling_session_id("sess-abc:sample:12") == ("sess-abc", 12)
    for bad in ["sess:sample:1", "sess:train:x", "sess:train:-1", "a/b:train:1", "sess:train", ""]:
        with pytest.raises(UserInputError) as err:
            parse_model_id(bad)
        assert err.value.field == "model_id"
    with pytest.raises(UserInputError):
        format_model_id("bad:session", 0)
    with pytest.raises(UserInputError):
        format_model_id("s", -1)
    assert ParsedCheckpointPath("m:train:0", "sampler", "x").segment == "sampler_weights"
