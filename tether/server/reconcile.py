"""Start-up reconciliation of the checkpoint files on disk with the catalogue.

`reconcile_storage(data_dir, catalogue)` runs once when the server starts, before it serves:

1. It takes an exclusive lock on the data directory. Holding it means no other live server shares
   these files, so every interrupted write can be finished or rolled back now, not an hour later.
   (Without the lock, another server is running there: only work older than an hour is touched and
   step 3 is skipped, as any younger directory may be its save in progress.)
2. Every interrupted save, overwrite and delete is recovered (`tether.storage.atomic`): staging
   and deleting directories are removed, and a checkpoint whose replacement never landed gets its
   old directory back, so an overwrite is atomic across crashes.
3. Catalogue and disk are made to agree: a listed checkpoint whose files are gone is unlisted, and
   a checkpoint directory the catalogue does not know (a save that crashed after its files were
   committed but before it was listed, so its client never got an answer) is removed.

It knows directories and catalogue rows, not formats: damaged files are found when they are loaded.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import IO
from urllib.parse import quote

from tether.server.catalogue import Catalogue, CheckpointRow
from tether.storage.atomic import DEFAULT_STALE_AFTER_S, is_hidden_work_dir, recover_directory
from tether.storage.manifest import MANIFEST_NAME
from tether.types.paths import SEGMENT_BY_KIND

log = logging.getLogger("tether.server")

LOCK_FILE = ".tether.lock"
CHECKPOINTS_DIR = "checkpoints"


class DataDirLock:
    """An exclusive `flock` on `<data_dir>/.tether.lock`, held until `release()`."""

    def __init__(self, data_dir: Path) -> None:
        self._handle: IO[str] | None = open(Path(data_dir) / LOCK_FILE, "a")  # noqa: SIM115 - held for the server's life
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.held = True
        except OSError:
            self.held = False

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing drops the flock
            self._handle = None


def reconcile_storage(data_dir: Path, catalogue: Catalogue) -> DataDirLock:
    """Recover interrupted writes and align catalogue and disk (see the module docstring).

    Returns the data directory's lock; the caller releases it when the server stops.
    """
    data_dir = Path(data_dir)
    lock = DataDirLock(data_dir)
    stale_after_s = 0.0 if lock.held else DEFAULT_STALE_AFTER_S
    if not lock.held:
        log.warning("another tether server holds %s; only old interrupted writes are recovered", data_dir)
    root = data_dir / CHECKPOINTS_DIR
    on_disk = _checkpoint_dirs(root, stale_after_s)
    rows = catalogue.all_checkpoints()
    listed = set()
    for row in rows:
        directory = _directory(root, row)
        listed.add(directory)
        if not (directory / MANIFEST_NAME).is_file():
            log.warning("checkpoint %s is listed but its files are gone; unlisting it", row.tinker_path)
            catalogue.delete_checkpoint(row.run_id, row.checkpoint_id)
    if lock.held:
        for directory in sorted(on_disk - listed):
            log.warning(
                "removing checkpoint files no catalogue entry names (a save interrupted before "
                "it was listed): %s",
                directory.relative_to(data_dir),
            )
            _remove(directory)
    return lock


def _directory(root: Path, row: CheckpointRow) -> Path:
    """Where `tether.server.checkpoints` keeps the row's files: <root>/<owner>/<run>/<segment>/<name>."""
    segment, _, name = row.checkpoint_id.partition("/")
    return root / row.owner / quote(row.run_id, safe="") / segment / name


def _checkpoint_dirs(root: Path, stale_after_s: float) -> set[Path]:
    """Every committed checkpoint directory under `root`, after recovering each segment directory."""
    found: set[Path] = set()
    if not root.is_dir():
        return found
    segments = set(SEGMENT_BY_KIND.values())
    for segment_dir in root.glob("*/*/*"):
        if not segment_dir.is_dir() or segment_dir.name not in segments:
            continue
        recover_directory(segment_dir, stale_after_s=stale_after_s)
        for entry in segment_dir.iterdir():
            if entry.is_dir() and not is_hidden_work_dir(entry.name):
                found.add(entry)
    return found


def _remove(directory: Path) -> None:
    from tether.storage.atomic import remove_directory

    try:
        remove_directory(directory)
    except OSError as exc:
        log.warning("could not remove %s: %s", directory, os.strerror(exc.errno or 0))
