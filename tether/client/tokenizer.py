"""Load a model's tokenizer on the client, offline when the server names a local directory.

tether's server reports `tokenizer_id` as a local directory when it has one (tinker-protocol.md
§7.2), so `get_tokenizer()` works without the Hugging Face Hub; a hub id still loads from the hub
or the local HF cache.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=8)
def load_tokenizer(tokenizer_id: str) -> Any:
    from transformers import AutoTokenizer

    if ":" in tokenizer_id and not Path(tokenizer_id).exists():
        tokenizer_id = tokenizer_id.split(":", 1)[0]
    return AutoTokenizer.from_pretrained(tokenizer_id)
