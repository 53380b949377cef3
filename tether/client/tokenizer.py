"""Load a model's tokenizer on the client, from wherever it can be resolved.

The server's get_info names a `tokenizer_id`: a hub id when the model has one, else the server's
local directory. In order, `load_tokenizer` uses:

1. `tokenizer_id` as a local directory (the client runs on the server's machine);
2. the server's copy (`GET /api/v1/tether/tokenizer/{base_model}/files`), downloaded once into
   `$TETHER_CACHE_DIR/tokenizers/<key>` (default `~/.cache/tether`), where the key is a digest of
   the server URL, the base model and the files' content digest, so a changed tokenizer gets a new
   directory and an unchanged one is never downloaded twice; every file is checked against the
   sha256 the server lists;
3. `tokenizer_id` as a Hugging Face hub id (hub or local HF cache).

It knows nothing about renderers or training; it only finds files and hands them to transformers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tether.client import routes
from tether.types.errors import ServerError, TetherError

_LOADED: dict[tuple[str, str, str], Any] = {}
_LOCK = threading.Lock()


def cache_root() -> Path:
    root = os.environ.get("TETHER_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "tether") / "tokenizers"


@lru_cache(maxsize=8)
def _from_pretrained(source: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def _hub_id(tokenizer_id: str) -> str:
    if ":" in tokenizer_id and not Path(tokenizer_id).exists():
        return tokenizer_id.split(":", 1)[0]
    return tokenizer_id


def load_tokenizer(tokenizer_id: str, *, session: Any = None, base_model: str | None = None) -> Any:
    """The tokenizer named by get_info: a local directory, the server's copy, or a hub id.

    `session` (the client's `ClientSession`) and `base_model` enable the server download. Raises
    whatever transformers raises when none of the three resolves (e.g. OSError offline).
    """
    local = Path(tokenizer_id).expanduser()
    if local.is_dir():
        return _from_pretrained(str(local))
    if session is None or not base_model:
        return _from_pretrained(_hub_id(tokenizer_id))
    key = (session.transport.base_url, base_model, tokenizer_id)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
    directory = fetch_tokenizer_files(session, base_model)
    tokenizer = (
        _from_pretrained(str(directory)) if directory is not None else _from_pretrained(_hub_id(tokenizer_id))
    )
    with _LOCK:
        _LOADED[key] = tokenizer
    return tokenizer


def fetch_tokenizer_files(session: Any, base_model: str) -> Path | None:
    """The server's tokenizer files for `base_model` in the local cache, downloaded if missing.

    None when the server does not serve them (an older server, or a model it does not know);
    `ServerError` when a downloaded file does not match its listed sha256.
    """
    transport = session.transport
    model_path = quote(base_model, safe="/")
    try:
        listing = session.run_sync(transport.call(routes.TOKENIZER_FILES.at(base_model=model_path)))
    except TetherError:
        return None
    files = listing.files
    names = [f.name for f in files]
    if not files or any(not n or n != Path(n).name or n.startswith(".") for n in names):
        return None
    key = hashlib.sha256(f"{transport.base_url}\n{base_model}\n{listing.digest}".encode()).hexdigest()[:32]
    target = cache_root() / key
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        for entry, name in zip(files, names, strict=True):
            content = session.run_sync(
                transport.call(routes.TOKENIZER_FILE.at(base_model=model_path, name=quote(name)))
            )
            if hashlib.sha256(content).hexdigest() != entry.sha256:
                raise ServerError(
                    f"tokenizer file {name!r} of {base_model!r} does not match its listed sha256"
                )
            (staging / name).write_bytes(content)
        (staging / ".complete").write_text(listing.digest)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / ".complete").exists():  # lost a race with another process: theirs is fine
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
