"""Pins the public surface of tether.storage and the wire modules, so a change to it is deliberate."""

from __future__ import annotations

import tether.storage
import tether.types.paths
import tether.types.proto
import tether.types.wire


def test_storage_surface():
    assert sorted(tether.storage.__all__) == [
        "CheckpointInfo",
        "CheckpointStore",
        "CorruptCheckpointError",
        "FsspecCheckpointStore",
        "LocalCheckpointStore",
        "LoraLayout",
        "StoredHfWeights",
        "StoredTrainingState",
    ]
    for name in tether.storage.__all__:
        assert getattr(tether.storage, name) is not None


def test_codec_and_path_surface():
    for module in (tether.types.proto, tether.types.paths, tether.types.wire):
        for name in module.__all__:
            assert hasattr(module, name), (module.__name__, name)
    assert {
        "encode_forward_backward_request",
        "decode_forward_backward_request",
        "encode_forward_backward_output",
        "decode_forward_backward_output",
        "encode_sample_response",
        "decode_sample_response",
    } <= set(tether.types.proto.__all__)
