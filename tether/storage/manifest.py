"""The manifest every checkpoint directory carries: what it is, its metadata, and a sha256 per file.

`manifest.json` is written last, after every other file, so its presence means the rest was
written; the checksums catch anything that changed afterwards (a truncated copy, bit rot, a file
edited by hand). The manifest itself carries a `digest`: the sha256 of its own canonical JSON
without that field, which covers every file's checksum and everything else that defines the
weights (kind, LoRA layout such as alpha, metadata), so an edited manifest fails too. Loading
verifies the manifest and the files it reads and raises `CorruptCheckpointError` naming the file
relative to the checkpoint (never a server path), instead of handing damaged weights to an engine.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tether.types.errors import DamagedDataError, NotFoundError

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_FORMAT",
    "CorruptCheckpointError",
    "manifest_digest",
    "write_manifest",
    "read_manifest",
    "parse_manifest",
    "verify_files",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tether.checkpoint/1"
_CHUNK_BYTES = 1 << 20


class CorruptCheckpointError(DamagedDataError):
    """A stored checkpoint's manifest or files do not match their digests (HTTP 422, not retryable)."""


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, its own `digest` field left out."""
    body = {key: value for key, value in manifest.items() if key != "digest"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(
    directory: Path, *, kind: str, metadata: dict[str, Any], layout: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Checksum every file under `directory` and write `manifest.json`; returns the manifest.

    `metadata` is the caller's (JSON-able, returned verbatim on load); `layout` is the format's own
    bookkeeping (tensor aliases, LoRA shape), kept apart so the two never collide.
    """
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        files[path.relative_to(directory).as_posix()] = {
            "sha256": sha256_file(path),
            "size": path.stat().st_size,
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "created_at": datetime.now(UTC).isoformat(),
        "files": files,
        "metadata": metadata,
        "layout": layout or {},
    }
    manifest["digest"] = manifest_digest(manifest)
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed manifest; NotFoundError if the directory has none, CorruptCheckpointError if unreadable."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise NotFoundError("no checkpoint there")
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise CorruptCheckpointError(f"{MANIFEST_NAME} is unreadable ({exc.strerror})") from exc
    return parse_manifest(text, where=MANIFEST_NAME)


def parse_manifest(text: bytes | str, *, where: str = MANIFEST_NAME) -> dict[str, Any]:
    """Parse and verify manifest bytes; `where` names them in errors (keep server paths out of it)."""
    try:
        manifest = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{where} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CorruptCheckpointError(f"{where} has an unknown format")
    if manifest.get("digest") != manifest_digest(manifest):
        raise CorruptCheckpointError(
            f"{where} does not match its digest (edited or damaged after it was written)"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
        for e in files.values()
    ):
        raise CorruptCheckpointError(f"{where} lists its files in an unknown form")
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any], names: list[str], *, hashes: bool = True) -> None:
    """Check that each named file exists with the size and (with `hashes`) sha256 the manifest recorded."""
    for name in names:
        expected = manifest["files"].get(name)
        path = Path(directory) / name
        if expected is None:
            raise CorruptCheckpointError(f"{name} is not listed in the manifest")
        if not path.is_file():
            raise CorruptCheckpointError(f"{name} is missing")
        if path.stat().st_size != expected["size"]:
            raise CorruptCheckpointError(
                f"{name} is {path.stat().st_size} bytes, the manifest recorded {expected['size']} "
                "(truncated or changed after it was written)"
            )
        if hashes and sha256_file(path) != expected["sha256"]:
            raise CorruptCheckpointError(
                f"{name} does not match its sha256 in the manifest (changed or damaged after it was written)"
            )
