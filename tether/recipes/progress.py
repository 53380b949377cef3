"""Progress bars for recipes (tqdm), silent when disabled or when stderr is not a terminal in tests."""

from __future__ import annotations

from typing import Any


def progress_bar(*, total: int, initial: int = 0, desc: str, enabled: bool = True) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)
