"""Serving a base model's tokenizer files, so a client on another machine can load the tokenizer.

`GET /api/v1/tether/tokenizer/{base_model}/files` lists the tokenizer files of a served base model
(name, size, sha256) with a digest of them all; `GET .../files/{name}` returns one of them. Only
files with a known tokenizer name are served, and only from the model's own directory: weights,
configs and any other path are not reachable. Both routes need an API key.

`client_tokenizer_id` is the `tokenizer_id` get_info reports: the hub id when the model comes from
the Hugging Face Hub (any machine can resolve it), else the server's local directory (resolvable
on this machine; elsewhere tether's SDK fetches the files through these routes).

This module knows nothing about tokenizing; it only lists and streams files.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from tether.server.config import ServerConfig
from tether.server.state import ServerState, request_owner, server_state
from tether.types.errors import NotFoundError

router = APIRouter(prefix="/api/v1/tether/tokenizer")

TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "chat_template.jinja",
        "chat_template.json",
    }
)
"""The file names a Hugging Face tokenizer is saved as; nothing else is ever served."""


def client_tokenizer_id(config: ServerConfig, base_model: str, local_dir: Path) -> str:
    """The hub id behind `base_model` when it has one, else the local tokenizer directory."""
    from tether.engine.default_model import DEFAULT_MODEL_NAME

    target = config.model_aliases.get(base_model, base_model)
    if target == DEFAULT_MODEL_NAME or Path(target).expanduser().is_dir():
        return str(local_dir)
    return target


def _tokenizer_dir(state: ServerState, base_model: str) -> Path:
    """The tokenizer directory the base model's trainer loaded (blocking the first time: call off the loop)."""
    state.trainers.check_served(base_model)
    return Path(state.trainers.base_info(base_model).tokenizer_id)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_tokenizer_files(directory: Path) -> dict[str, Any]:
    """{"files": [{"name", "size", "sha256"}], "digest"} of the tokenizer files in `directory`."""
    files = [
        {"name": path.name, "size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.iterdir())
        if path.name in TOKENIZER_FILES and path.is_file()
    ]
    if not files:
        raise NotFoundError(
            f"no tokenizer files in the model directory of this base model ({directory.name})"
        )
    digest = hashlib.sha256("".join(f"{f['name']}\0{f['sha256']}\n" for f in files).encode()).hexdigest()
    return {"files": files, "digest": digest}


@router.get("/{base_model:path}/files")
async def tokenizer_files(
    base_model: str, state: ServerState = Depends(server_state), owner: str = Depends(request_owner)
) -> dict[str, Any]:
    directory = await asyncio.to_thread(_tokenizer_dir, state, base_model)
    listing = await asyncio.to_thread(list_tokenizer_files, directory)
    return {"base_model": base_model, **listing}


@router.get("/{base_model:path}/files/{name}")
async def tokenizer_file(
    base_model: str,
    name: str,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> FileResponse:
    if name not in TOKENIZER_FILES:
        raise NotFoundError(f"{name!r} is not a tokenizer file; tokenizer files: {sorted(TOKENIZER_FILES)}")
    directory = await asyncio.to_thread(_tokenizer_dir, state, base_model)
    path = directory / name
    if not path.is_file():
        raise NotFoundError(f"this base model's tokenizer has no {name!r}")
    return FileResponse(path, media_type="application/octet-stream")
