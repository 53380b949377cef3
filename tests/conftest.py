"""Shared test fixtures.

Every test session generates the embedded default model once into its own temporary cache directory
(`TETHER_CACHE_DIR`, inherited by any server subprocess a test starts), so tests never depend on or
pollute the user's cache.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="tether-test-cache-"))
os.environ.setdefault("TETHER_CACHE_DIR", str(_SESSION_CACHE))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model, generated once per test session."""
    from tether.engine.default_model import ensure_default_model

    return ensure_default_model()
