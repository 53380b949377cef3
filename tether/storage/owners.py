"""Owner-scoped checkpoint stores: `<data_dir>/checkpoints/<owner>/`, one `LocalCheckpointStore` each.

Each API key's owner has its own tree, so one key's names never collide with, or reveal, another's.
The server (catalogue side) and the trainer (which writes the files) address checkpoints the same
way through this one class.
"""

from __future__ import annotations

import threading
from pathlib import Path

from tether.storage.store import LocalCheckpointStore
from tether.types.paths import ParsedCheckpointPath


class OwnerStores:
    """`store(owner)` for every owner under `<data_dir>/checkpoints/`; thread-safe."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "checkpoints"
        self._lock = threading.Lock()
        self._stores: dict[str, LocalCheckpointStore] = {}

    def store(self, owner: str) -> LocalCheckpointStore:
        with self._lock:
            store = self._stores.get(owner)
            if store is None:
                store = self._stores[owner] = LocalCheckpointStore(self.root / owner)
            return store

    def directory(self, owner: str, path: ParsedCheckpointPath) -> Path:
        return self.store(owner).directory(path)
