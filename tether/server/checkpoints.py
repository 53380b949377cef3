"""The server's side of checkpoint files: where they are, copying and deleting them.

Files are written by the trainer (`tether.trainer.checkpoint_io`); the server only copies, deletes
and sizes them, and records them in the catalogue. Each owner has its own directory tree
(`tether.storage.owners`), so one key's names never collide with, or reveal, another's.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from tether.types.errors import NotFoundError
from tether.types.paths import ParsedCheckpointPath

if TYPE_CHECKING:  # storage needs torch: imported on first use, so the server starts fast
    from tether.storage import CheckpointInfo, LocalCheckpointStore
    from tether.storage.owners import OwnerStores


class CheckpointFiles:
    """Owner-scoped checkpoint stores under `<data_dir>/checkpoints/<owner>/`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._lock = threading.Lock()
        self._stores: OwnerStores | None = None

    def store(self, owner: str) -> LocalCheckpointStore:
        with self._lock:
            if self._stores is None:
                from tether.storage.owners import OwnerStores

                self._stores = OwnerStores(self.data_dir)
        return self._stores.store(owner)

    def directory(self, owner: str, path: ParsedCheckpointPath) -> Path:
        return self.store(owner).directory(path)

    def copy(
        self, source_owner: str, source: ParsedCheckpointPath, owner: str, destination: ParsedCheckpointPath
    ) -> CheckpointInfo:
        """Copy a complete checkpoint (its manifest verifies the copy like the original)."""
        import shutil

        from tether.storage.atomic import atomic_directory

        source_dir = self.directory(source_owner, source)
        if not source_dir.is_dir():
            raise NotFoundError(f"checkpoint files of {source} are missing")
        store = self.store(owner)
        with atomic_directory(store.directory(destination)) as staging:
            shutil.copytree(source_dir, staging, dirs_exist_ok=True)
        return store.info(destination)

    def delete(self, owner: str, path: ParsedCheckpointPath) -> None:
        """Remove a checkpoint's files (already gone is fine: deletion is idempotent)."""
        try:
            self.store(owner).delete(path)
        except NotFoundError:
            pass
