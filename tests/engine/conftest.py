"""Fixtures for the engine tests: one loaded default model per session, a fresh engine per test."""

from __future__ import annotations

import pytest

from tether.engine.default_model import DEFAULT_MODEL_NAME
from tether.engine.model_loading import load_base_model


@pytest.fixture(scope="session")
def default_base(default_model_dir):
    """The default model loaded once; engines built on it remove their adapters when done."""
    return load_base_model(DEFAULT_MODEL_NAME)


@pytest.fixture
def training_engine(default_base):
    from tether.engine.training_engine import TrainingEngine

    engine = TrainingEngine(default_base)
    yield engine
    for model_id in engine.list_models():
        engine.delete_model(model_id)
