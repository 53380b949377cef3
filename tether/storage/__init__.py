"""Checkpoint storage: formats (training state, Hugging Face weights), atomic writes, checksums and
stores addressed by `tinker://` path; exact compressed weight deltas for weight sync live in
`tether.storage.delta`, and base / delta / merged-base sampler checkpoint chains in
`tether.storage.sampler_chain`. Knows tensors and JSON metadata, never the engine.

The names below load on first use, so torch-free parts (`tether.storage.atomic`,
`tether.storage.manifest`) can be imported by a server that has not loaded torch yet.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tether.storage.formats import LoraLayout, StoredHfWeights, StoredTrainingState
    from tether.storage.fsspec_store import FsspecCheckpointStore
    from tether.storage.manifest import CorruptCheckpointError
    from tether.storage.store import CheckpointInfo, CheckpointStore, LocalCheckpointStore

__all__ = [
    "CheckpointInfo",
    "CheckpointStore",
    "CorruptCheckpointError",
    "FsspecCheckpointStore",
    "LocalCheckpointStore",
    "LoraLayout",
    "StoredHfWeights",
    "StoredTrainingState",
]

_HOMES = {
    "LoraLayout": "formats",
    "StoredHfWeights": "formats",
    "StoredTrainingState": "formats",
    "FsspecCheckpointStore": "fsspec_store",
    "CorruptCheckpointError": "manifest",
    "CheckpointInfo": "store",
    "CheckpointStore": "store",
    "LocalCheckpointStore": "store",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'tether.storage' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tether.storage.{home}"), name)
