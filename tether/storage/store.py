"""Checkpoint stores: where checkpoints live, addressed by their `tinker://` path.

`CheckpointStore` is the interface the server uses; `LocalCheckpointStore` keeps checkpoints
under one root directory as `<root>/<quoted training_run_id>/<segment>/<name>/`. Every save is
atomic (`tether.storage.atomic`) and every load verifies checksums (`tether.storage.manifest`).
The store knows formats and files, not owners or TTLs: who may see a checkpoint and when it
expires is the server's catalogue.

Kinds map to formats: `weights/` holds training state; `sampler_weights/` and
`external_weights/` hold Hugging Face weights (PEFT adapter or full model).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote, unquote

from tether.storage.atomic import (
    DEFAULT_STALE_AFTER_S,
    atomic_directory,
    is_hidden_work_dir,
    recover_directory,
    remove_directory,
)
from tether.storage.formats import (
    HF_WEIGHTS_KIND,
    TRAINING_STATE_KIND,
    StoredHfWeights,
    StoredTrainingState,
    read_hf_weights,
    read_training_state,
    verify_training_state,
    write_hf_weights,
    write_training_state,
)
from tether.storage.manifest import MANIFEST_NAME, CorruptCheckpointError, read_manifest, write_manifest
from tether.types.errors import NotFoundError, UserInputError
from tether.types.paths import SEGMENT_BY_KIND, ParsedCheckpointPath, parse_checkpoint_path

T = TypeVar("T")

__all__ = [
    "CheckpointInfo",
    "CheckpointStore",
    "LocalCheckpointStore",
    "info_from_manifest",
    "require_format",
    "require_kind",
]

CheckpointRef = ParsedCheckpointPath | str


@dataclass(frozen=True)
class CheckpointInfo:
    """What the store knows about one checkpoint without loading its tensors."""

    path: ParsedCheckpointPath
    format: str
    """`training_state` or `hf_weights`."""
    size_bytes: int
    created_at: datetime
    metadata: dict[str, Any] = field(default_factory=dict)
    is_lora: bool | None = None
    """For HF weights: adapter (True) or full model (False); None for training state."""
    files: dict[str, int] = field(default_factory=dict)
    """Relative path → size in bytes of every data file (the manifest itself excluded)."""

    @property
    def tinker_path(self) -> str:
        return self.path.tinker_path


def parse_ref(ref: CheckpointRef) -> ParsedCheckpointPath:
    return ref if isinstance(ref, ParsedCheckpointPath) else parse_checkpoint_path(ref)


def require_kind(path: ParsedCheckpointPath, allowed: tuple[str, ...], what: str) -> None:
    if path.kind not in allowed:
        segments = " or ".join(SEGMENT_BY_KIND[k] for k in allowed)
        raise UserInputError(f"{what} lives under {segments}/, not {path.segment}/", field="path")


class CheckpointStore(ABC):
    """Save, load, list and delete checkpoints by `tinker://` path.

    The formats are written and read here, once, in a local directory; a store only says how that
    directory is published atomically (`_save`) and how a checkpoint's files are made local to be
    read (`_checkout`).
    """

    def save_training_state(
        self, ref: CheckpointRef, state: StoredTrainingState, *, overwrite: bool = False
    ) -> CheckpointInfo:
        """Store training state under a `weights/` path. ConflictError if taken and not `overwrite`."""
        path = parse_ref(ref)
        require_kind(path, ("training",), "training state")

        def write(staging: Path) -> None:
            layout = write_training_state(staging, state)
            write_manifest(staging, kind=TRAINING_STATE_KIND, metadata=state.metadata, layout=layout)

        return self._save(path, write, overwrite=overwrite)

    def save_training_state_files(
        self,
        ref: CheckpointRef,
        write: Callable[[Path], dict[str, Any]],
        *,
        metadata: dict[str, Any],
        overwrite: bool = False,
    ) -> CheckpointInfo:
        """Store training state whose files `write(staging)` puts in the staging directory and whose
        manifest layout it returns (a multi-rank trainer's DCP checkpoint: `{"dcp": "dcp", ...}`).
        Local stores only: the ranks write into the staging directory themselves."""
        path = parse_ref(ref)
        require_kind(path, ("training",), "training state")

        def staged(staging: Path) -> None:
            layout = write(staging)
            write_manifest(staging, kind=TRAINING_STATE_KIND, metadata=metadata, layout=layout)

        return self._save(path, staged, overwrite=overwrite)

    def load_training_state(
        self, ref: CheckpointRef, *, include_optimizer: bool = False
    ) -> StoredTrainingState:
        """Load (and verify) training state; NotFoundError if absent."""
        path = parse_ref(ref)
        with (
            naming_damage(path),
            self._checkout(path, TRAINING_STATE_KIND, "training state") as (directory, manifest),
        ):
            return read_training_state(directory, manifest, include_optimizer=include_optimizer)

    def read_training_state_files(
        self,
        ref: CheckpointRef,
        read: Callable[[Path, dict[str, Any]], T],
        *,
        include_optimizer: bool = False,
        hashes: bool = True,
    ) -> T:
        """`read(directory, manifest)` over a training state's verified files in a local directory.

        For a reader that loads only part of each tensor (a multi-rank trainer reading its shards,
        see `formats.training_state_reader`). NotFoundError if absent; UserInputError if
        `include_optimizer` asks for moments it was saved without; CorruptCheckpointError if a
        file's size (or, with `hashes`, its sha256) is not the manifest's. Without `hashes` the
        caller checks them itself (`formats.verify_training_state`), e.g. on one rank of many.
        """
        path = parse_ref(ref)
        with (
            naming_damage(path),
            self._checkout(path, TRAINING_STATE_KIND, "training state") as (directory, manifest),
        ):
            verify_training_state(directory, manifest, include_optimizer=include_optimizer, hashes=hashes)
            return read(directory, manifest)

    def save_hf_weights(
        self,
        ref: CheckpointRef,
        weights: StoredHfWeights,
        *,
        overwrite: bool = False,
        base_model_dir: Path | None = None,
        tokenizer_dir: Path | None = None,
    ) -> CheckpointInfo:
        """Store HF weights under a `sampler_weights/` or `external_weights/` path."""
        path = parse_ref(ref)
        require_kind(path, ("sampler", "external"), "Hugging Face weights")

        def write(staging: Path) -> None:
            layout = write_hf_weights(
                staging, weights, base_model_dir=base_model_dir, tokenizer_dir=tokenizer_dir
            )
            write_manifest(staging, kind=HF_WEIGHTS_KIND, metadata=weights.metadata, layout=layout)

        return self._save(path, write, overwrite=overwrite)

    def load_hf_weights(self, ref: CheckpointRef) -> StoredHfWeights:
        """Load (and verify) HF weights; NotFoundError if absent."""
        path = parse_ref(ref)
        with (
            naming_damage(path),
            self._checkout(path, HF_WEIGHTS_KIND, "sampler weights") as (directory, manifest),
        ):
            return read_hf_weights(directory, manifest)

    @abstractmethod
    def _save(
        self, path: ParsedCheckpointPath, write: Callable[[Path], None], *, overwrite: bool
    ) -> CheckpointInfo:
        """Let `write` fill an empty local staging directory, then publish it atomically as `path`.

        ConflictError if `path` is taken and not `overwrite`; nothing is published if `write` raises.
        """

    @abstractmethod
    def _checkout(
        self, path: ParsedCheckpointPath, kind: str, what: str
    ) -> AbstractContextManager[tuple[Path, dict[str, Any]]]:
        """The checkpoint's files in a local directory, and its manifest, for reading.

        NotFoundError if absent; UserInputError (naming `what` was wanted) if it holds another kind.
        """

    @abstractmethod
    def info(self, ref: CheckpointRef) -> CheckpointInfo:
        """Format, size and metadata; NotFoundError if absent."""

    @abstractmethod
    def delete(self, ref: CheckpointRef) -> None:
        """Remove a checkpoint atomically; NotFoundError if absent."""

    @abstractmethod
    def list(self, training_run_id: str | None = None) -> list[CheckpointInfo]:
        """Every complete checkpoint (of one run, if given), oldest first."""

    @abstractmethod
    def open_file(self, ref: CheckpointRef, relative_path: str) -> BinaryIO:
        """Open one of the checkpoint's files for reading (to stream a download).

        Only files listed in the manifest can be opened, so a request path can never escape the
        checkpoint; anything else is NotFoundError.
        """

    def list_files(self, ref: CheckpointRef) -> dict[str, int]:
        """The checkpoint's files (relative path → size in bytes), as recorded in its manifest."""
        return dict(self.info(ref).files)

    def exists(self, ref: CheckpointRef) -> bool:
        try:
            self.info(ref)
        except NotFoundError:
            return False
        return True

    def size_bytes(self, ref: CheckpointRef) -> int:
        return self.info(ref).size_bytes


class LocalCheckpointStore(CheckpointStore):
    """Checkpoints in a local directory tree; finishes or rolls back interrupted writes on open."""

    def __init__(self, root: Path | str, *, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> None:
        """Open (creating) the store at `root` and recover work left by crashes older than `stale_after_s`."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.recover(stale_after_s=stale_after_s)

    def recover(self, *, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> None:
        """Remove interrupted saves and deletes, restore checkpoints whose replacement never landed."""
        for segment_dir in self.root.glob("*/*"):
            if segment_dir.is_dir():
                recover_directory(segment_dir, stale_after_s=stale_after_s)

    def directory(self, ref: CheckpointRef) -> Path:
        """The checkpoint's directory (for serving its files); it may not exist."""
        path = parse_ref(ref)
        return self.root / quote(path.training_run_id, safe="") / path.segment / path.name

    def _save(
        self, path: ParsedCheckpointPath, write: Callable[[Path], None], *, overwrite: bool
    ) -> CheckpointInfo:
        with atomic_directory(self.directory(path), overwrite=overwrite) as staging:
            write(staging)
        return self.info(path)

    @contextmanager
    def _checkout(
        self, path: ParsedCheckpointPath, kind: str, what: str
    ) -> Iterator[tuple[Path, dict[str, Any]]]:
        manifest = self._manifest(path)
        require_format(path, manifest, kind, what)
        yield self.directory(path), manifest

    def info(self, ref: CheckpointRef) -> CheckpointInfo:
        path = parse_ref(ref)
        return self._info(path, self._manifest(path))

    def delete(self, ref: CheckpointRef) -> None:
        path = parse_ref(ref)
        if not remove_directory(self.directory(path)):
            raise NotFoundError(f"checkpoint {path} does not exist")

    def list(self, training_run_id: str | None = None) -> list[CheckpointInfo]:
        runs = (
            [self.root / quote(training_run_id, safe="")] if training_run_id else sorted(self.root.iterdir())
        )
        found = []
        for run_dir in runs:
            for kind, segment in SEGMENT_BY_KIND.items():
                segment_dir = run_dir / segment
                if not segment_dir.is_dir():
                    continue
                for entry in sorted(segment_dir.iterdir()):
                    if is_hidden_work_dir(entry.name) or not (entry / MANIFEST_NAME).is_file():
                        continue
                    path = ParsedCheckpointPath(unquote(run_dir.name), kind, entry.name)  # type: ignore[arg-type]
                    try:
                        found.append(self._info(path, read_manifest(entry)))
                    except CorruptCheckpointError:
                        continue
        return sorted(found, key=lambda info: (info.created_at, info.tinker_path))

    def open_file(self, ref: CheckpointRef, relative_path: str) -> BinaryIO:
        path = parse_ref(ref)
        if relative_path not in self._manifest(path)["files"]:
            raise NotFoundError(f"checkpoint {path} has no file {relative_path!r}")
        return open(self.directory(path) / relative_path, "rb")

    def _manifest(self, path: ParsedCheckpointPath) -> dict[str, Any]:
        directory = self.directory(path)
        if not (directory / MANIFEST_NAME).is_file():
            raise NotFoundError(f"checkpoint {path} does not exist")
        with naming_damage(path):
            return read_manifest(directory)

    def _info(self, path: ParsedCheckpointPath, manifest: dict[str, Any]) -> CheckpointInfo:
        return info_from_manifest(path, manifest, (self.directory(path) / MANIFEST_NAME).stat().st_size)


@contextmanager
def naming_damage(path: ParsedCheckpointPath) -> Iterator[None]:
    """Prefix a CorruptCheckpointError with the checkpoint's tinker:// path (once)."""
    try:
        yield
    except CorruptCheckpointError as exc:
        if exc.message.startswith("checkpoint tinker://"):
            raise
        raise CorruptCheckpointError(f"checkpoint {path.tinker_path} is damaged: {exc.message}") from None


def require_format(path: ParsedCheckpointPath, manifest: dict[str, Any], kind: str, what: str) -> None:
    """UserInputError unless the checkpoint's manifest says it holds `kind` (described as `what`)."""
    if manifest["kind"] != kind:
        raise UserInputError(f"{path} holds {manifest['kind']}, not {what}", field="path")


def info_from_manifest(
    path: ParsedCheckpointPath, manifest: dict[str, Any], manifest_size: int
) -> CheckpointInfo:
    """A CheckpointInfo from a checkpoint's manifest (size = every listed file + the manifest)."""
    layout = manifest.get("layout", {})
    return CheckpointInfo(
        path=path,
        format=manifest["kind"],
        size_bytes=manifest_size + sum(entry["size"] for entry in manifest["files"].values()),
        created_at=datetime.fromisoformat(manifest["created_at"]),
        metadata=manifest.get("metadata", {}),
        is_lora=layout.get("is_lora") if manifest["kind"] == HF_WEIGHTS_KIND else None,
        files={name: int(entry["size"]) for name, entry in manifest["files"].items()},
    )
