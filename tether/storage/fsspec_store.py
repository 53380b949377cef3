"""A checkpoint store on any fsspec filesystem (S3, GCS, Azure, a mounted share, `memory://`).

Object stores cannot rename a directory atomically, so a checkpoint is versioned instead:

    <root>/<quoted training_run_id>/<segment>/<name>/v-<id>/...   the files and manifest.json
    <root>/<quoted training_run_id>/<segment>/<name>/CURRENT      the live version id

A save uploads a complete new version first and then writes `CURRENT` (one small object, which
object stores replace atomically); only then is the previous version deleted. A crash before
`CURRENT` is written leaves an unreferenced version nobody reads (`collect_garbage` removes it),
and the old checkpoint stays intact. A delete removes `CURRENT` first, so the checkpoint
disappears at once. Files are staged and verified in a local temporary directory with the same
format code as `LocalCheckpointStore`.

The `overwrite=False` check is not atomic across concurrent writers on object stores; the
server's catalogue serialises saves of one name.
"""

from __future__ import annotations

import builtins
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, unquote

from tether.storage.manifest import MANIFEST_NAME, CorruptCheckpointError, parse_manifest
from tether.storage.store import (
    CheckpointInfo,
    CheckpointRef,
    CheckpointStore,
    info_from_manifest,
    naming_damage,
    parse_ref,
    require_format,
)
from tether.types.errors import ConflictError, NotFoundError
from tether.types.paths import SEGMENT_BY_KIND, ParsedCheckpointPath

__all__ = ["FsspecCheckpointStore"]

CURRENT = "CURRENT"
_VERSION_PREFIX = "v-"


class FsspecCheckpointStore(CheckpointStore):
    """Checkpoints under an fsspec URL (`s3://bucket/prefix`, `memory://root`, ...)."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")

    def directory(self, ref: CheckpointRef) -> str:
        """The checkpoint's prefix in the filesystem (holds CURRENT and version folders)."""
        path = parse_ref(ref)
        return f"{self.root}/{quote(path.training_run_id, safe='')}/{path.segment}/{path.name}"

    # ---- save ---------------------------------------------------------------------------------

    def _save(
        self, path: ParsedCheckpointPath, write: Callable[[Path], None], *, overwrite: bool
    ) -> CheckpointInfo:
        prefix = self.directory(path)
        previous = self._current_version(prefix)
        if previous is not None and not overwrite:
            raise ConflictError(f"checkpoint {path} already exists")
        version = f"{_VERSION_PREFIX}{uuid.uuid4().hex}"
        with tempfile.TemporaryDirectory(prefix="tether-ckpt-") as tmp:
            staging = Path(tmp)
            write(staging)
            files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
            try:
                for file in files:  # the manifest goes last: a version is complete once it has one
                    self.fs.put_file(str(file), f"{prefix}/{version}/{file.relative_to(staging).as_posix()}")
                self.fs.put_file(str(staging / MANIFEST_NAME), f"{prefix}/{version}/{MANIFEST_NAME}")
                if not overwrite and self._current_version(prefix) is not None:
                    raise ConflictError(f"checkpoint {path} already exists")
                self.fs.pipe_file(f"{prefix}/{CURRENT}", version.encode())
            except BaseException:
                self._remove(f"{prefix}/{version}")
                raise
        if previous is not None and previous != version:
            self._remove(f"{prefix}/{previous}")
        return self.info(path)

    # ---- load / inspect -----------------------------------------------------------------------

    @contextmanager
    def _checkout(
        self, path: ParsedCheckpointPath, kind: str, what: str
    ) -> Iterator[tuple[Path, dict[str, Any]]]:
        version_dir, manifest = self._manifest(path)
        require_format(path, manifest, kind, what)
        with tempfile.TemporaryDirectory(prefix="tether-ckpt-") as tmp:
            self._download(version_dir, manifest, Path(tmp))
            yield Path(tmp), manifest

    def download(self, ref: CheckpointRef, target: Path) -> Path:
        """Copy a checkpoint's files (HF layout included) into local directory `target`."""
        version_dir, manifest = self._manifest(parse_ref(ref))
        target = Path(target)
        target.mkdir(parents=True, exist_ok=True)
        self._download(version_dir, manifest, target)
        return target

    def open_file(self, ref: CheckpointRef, relative_path: str) -> BinaryIO:
        path = parse_ref(ref)
        version_dir, manifest = self._manifest(path)
        if relative_path not in manifest["files"]:
            raise NotFoundError(f"checkpoint {path} has no file {relative_path!r}")
        return self.fs.open(f"{version_dir}/{relative_path}", "rb")

    def signed_urls(self, ref: CheckpointRef, *, expires_s: int = 3600) -> dict[str, str]:
        """Pre-signed download URLs per file, where the filesystem supports them (S3, GCS, ...).

        Raises NotImplementedError otherwise; the server then streams through `open_file`.
        """
        version_dir, manifest = self._manifest(parse_ref(ref))
        return {
            name: self.fs.sign(f"{version_dir}/{name}", expiration=expires_s) for name in manifest["files"]
        }

    def info(self, ref: CheckpointRef) -> CheckpointInfo:
        path = parse_ref(ref)
        version_dir, manifest = self._manifest(path)
        return info_from_manifest(path, manifest, int(self.fs.size(f"{version_dir}/{MANIFEST_NAME}")))

    def delete(self, ref: CheckpointRef) -> None:
        path = parse_ref(ref)
        prefix = self.directory(path)
        if self._current_version(prefix) is None:
            raise NotFoundError(f"checkpoint {path} does not exist")
        self.fs.rm_file(f"{prefix}/{CURRENT}")
        self._remove(prefix)

    def list(self, training_run_id: str | None = None) -> list[CheckpointInfo]:
        if training_run_id is not None:
            run_names = [quote(training_run_id, safe="")]
        else:
            run_names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in self._ls(self.root)]
        found = []
        for run_name in run_names:
            for kind, segment in SEGMENT_BY_KIND.items():
                for entry in self._ls(f"{self.root}/{run_name}/{segment}"):
                    name = entry.rstrip("/").rsplit("/", 1)[-1]
                    path = ParsedCheckpointPath(unquote(run_name), kind, name)  # type: ignore[arg-type]
                    try:
                        found.append(self.info(path))
                    except (NotFoundError, CorruptCheckpointError):
                        continue
        return sorted(found, key=lambda info: (info.created_at, info.tinker_path))

    def collect_garbage(self, *, min_age_s: float = 3600.0) -> int:
        """Remove versions no CURRENT points to and older than `min_age_s` (crashed or raced saves).

        Returns how many were removed. The age guard keeps a save in progress safe.
        """
        removed = 0
        now = time.time()
        for run in self._ls(self.root):
            for segment in SEGMENT_BY_KIND.values():
                for checkpoint in self._ls(f"{run.rstrip('/')}/{segment}"):
                    prefix = checkpoint.rstrip("/")
                    live = self._current_version(prefix)
                    for entry in self._ls(prefix):
                        version = entry.rstrip("/").rsplit("/", 1)[-1]
                        if not version.startswith(_VERSION_PREFIX) or version == live:
                            continue
                        if now - self._modified(f"{prefix}/{version}") >= min_age_s:
                            self._remove(f"{prefix}/{version}")
                            removed += 1
        return removed

    # ---- internals ----------------------------------------------------------------------------

    def _current_version(self, prefix: str) -> str | None:
        try:
            version = self.fs.cat_file(f"{prefix}/{CURRENT}").decode().strip()
        except FileNotFoundError:
            return None
        return version or None

    def _manifest(self, path: ParsedCheckpointPath) -> tuple[str, dict[str, Any]]:
        prefix = self.directory(path)
        version = self._current_version(prefix)
        if version is None:
            raise NotFoundError(f"checkpoint {path} does not exist")
        version_dir = f"{prefix}/{version}"
        try:
            text = self.fs.cat_file(f"{version_dir}/{MANIFEST_NAME}")
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(
                f"checkpoint {path.tinker_path} is damaged: live version {version} has no manifest"
            ) from exc
        with naming_damage(path):
            return version_dir, parse_manifest(text)

    def _download(self, version_dir: str, manifest: dict[str, Any], target: Path) -> None:
        for relative in manifest["files"]:
            local = target / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fs.get_file(f"{version_dir}/{relative}", str(local))
            except FileNotFoundError:
                continue  # verify_files reports it as missing, for the files the caller needs

    def _ls(self, prefix: str) -> builtins.list[str]:  # `list` here is the method above
        try:
            return sorted(self.fs.ls(prefix, detail=False))
        except FileNotFoundError:
            return []

    def _modified(self, prefix: str) -> float:
        times = []
        for file in self.fs.find(prefix):
            try:
                times.append(self.fs.modified(file).timestamp())
            except (NotImplementedError, FileNotFoundError, AttributeError):
                continue
        return max(times) if times else time.time()  # unknown age: treat as new, never delete

    def _remove(self, prefix: str) -> None:
        try:
            self.fs.rm(prefix, recursive=True)
        except FileNotFoundError:
            pass
