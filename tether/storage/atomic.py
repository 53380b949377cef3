"""Crash-safe directory writes: a checkpoint appears complete under its name, or not at all.

A writer fills a staging directory next to the destination (same filesystem, so the final
`rename` is atomic), fsyncs every file and the directory, and only then renames it into place.
Replacing an existing directory moves the old one aside first and deletes it after the new one is
in place; `recover_directory` (run when a store opens) finishes or rolls back whatever a crash
interrupted: stale staging directories are removed, and an old directory whose replacement never
arrived is put back. Readers only ever look at non-hidden names, so they never see a partial write.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tether.types.errors import ConflictError

__all__ = [
    "DEFAULT_STALE_AFTER_S",
    "atomic_directory",
    "remove_directory",
    "recover_directory",
    "fsync_tree",
    "is_hidden_work_dir",
]

_STAGING = ".tmp-"
_OLD = ".old-"
_DELETING = ".del-"
_commit_lock = threading.Lock()

DEFAULT_STALE_AFTER_S = 3600.0
"""Work directories younger than this may belong to another live process sharing the root."""


def _work_dir(parent: Path, name: str, tag: str) -> Path:
    # The creation time is part of the name: a renamed directory keeps its old mtime, so the name is
    # the only reliable age of a retired (`.old-`) directory.
    return Path(tempfile.mkdtemp(prefix=f".{name}{tag}{int(time.time())}-", dir=parent))


def _age_s(entry: Path, now: float) -> float:
    try:
        created = float(entry.name.rsplit("-", 2)[-2])
    except (IndexError, ValueError):
        created = 0.0
    try:
        touched = entry.stat().st_mtime
    except FileNotFoundError:
        touched = 0.0
    return now - max(created, touched)


def is_hidden_work_dir(name: str) -> bool:
    """True for the staging / retired / deleting directories this module leaves while working."""
    return name.startswith(".") and any(tag in name for tag in (_STAGING, _OLD, _DELETING))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (children before parents), then `root`."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(directory) / name)
        _fsync_path(Path(directory))


@contextmanager
def atomic_directory(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; on a clean exit make it `final` atomically.

    If the body raises, the staging directory is removed and `final` (if it existed) is untouched.
    Without `overwrite`, an existing `final` raises ConflictError (checked before and at commit).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise ConflictError(f"{final.name!r} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = _work_dir(final.parent, final.name, _STAGING)
    try:
        yield staging
        fsync_tree(staging)
        _commit(staging, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _commit(staging: Path, final: Path, *, overwrite: bool) -> None:
    with _commit_lock:
        retired: Path | None = None
        if final.exists():
            if not overwrite:
                raise ConflictError(f"{final.name!r} already exists")
            retired = _work_dir(final.parent, final.name, _OLD)
            os.replace(final, retired)  # replaces the empty placeholder directory
        try:
            os.rename(staging, final)
        except OSError:
            if retired is not None:
                os.replace(retired, final)
            raise
        _fsync_path(final.parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def remove_directory(path: Path) -> bool:
    """Delete `path` so that it disappears atomically (renamed aside, then removed). False if absent."""
    path = Path(path)
    with _commit_lock:
        if not path.exists():
            return False
        doomed = _work_dir(path.parent, path.name, _DELETING)
        os.replace(path, doomed)
        _fsync_path(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def recover_directory(parent: Path, *, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> None:
    """Clean up after a crash in `parent`: drop staging and deleting dirs, restore orphaned old dirs.

    Only work directories older than `stale_after_s` are touched, so a store opened by one process
    never disturbs a save that another process sharing the root is still making.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return
    now = time.time()
    with _commit_lock:
        for entry in sorted(parent.iterdir()):
            if not entry.is_dir() or not is_hidden_work_dir(entry.name) or _age_s(entry, now) < stale_after_s:
                continue
            if _OLD in entry.name:
                original = parent / entry.name[1:].split(_OLD, 1)[0]
                if not original.exists():
                    os.replace(entry, original)
                    continue
            shutil.rmtree(entry, ignore_errors=True)
