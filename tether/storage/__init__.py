"""Checkpoint storage: formats (training state, Hugging Face weights), atomic writes, checksums and
stores addressed by `tinker://` path; exact compressed weight deltas for weight sync live in
`tether.storage.delta`, and base / delta / merged-base sampler checkpoint chains in
`tether.storage.sampler_chain`. Knows tensors and JSON metadata, never the engine."""

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
