"""Fixtures for trainer-job tests: a control plane (`tether serve` in a thread) whose jobs are real
`tether.jobs.runner` processes serving the embedded default model; small and bounded for a shared CPU."""

from __future__ import annotations

import numpy as np
import pytest

from tether.server.config import ServerConfig
from tether.server.main import ServerThread
from tether.types.data import Datum, ModelInput

ALICE = "tml-alice"
BOB = "tml-bob"
BASE = "tether/tiny-qwen3"


def control_plane_config(data_dir, **overrides) -> ServerConfig:
    values = dict(
        port=0,
        data_dir=data_dir,
        api_keys=[ALICE, BOB],
        long_poll_s=5,
        job_poll_interval_s=0.2,
        job_startup_timeout_s=180,
        torch_threads=1,
        device="cpu",
        dtype="float32",
    )
    values.update(overrides)
    return ServerConfig(**values)


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory, default_model_dir):
    """(base_url, app) of a control plane with the local launcher."""
    server = ServerThread(control_plane_config(tmp_path_factory.mktemp("cp")))
    url = server.start()
    try:
        yield url, server.app
    finally:
        server.stop()


def batch(step: int) -> list[Datum]:
    """A deterministic batch for `step` (the data position is the step)."""
    rng = np.random.default_rng(1000 + step)
    tokens = rng.integers(3, 200, size=9).tolist()
    return [
        Datum(
            model_input=ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={
                "target_tokens": np.array(tokens[1:], dtype=np.int64),
                "weights": np.ones(8, dtype=np.float32),
            },
        )
    ]
