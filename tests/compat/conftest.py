"""A tether server on a free port for the official-SDK conformance tests (one per module and trainer mode).

Every conformance test runs twice: against the in-process trainer and against a `tether trainer`
process behind the op socket (`ServerConfig.trainer_process`).
"""

from __future__ import annotations

import os

import pytest

from tether.server.config import ServerConfig
from tether.server.main import ServerThread

API_KEY = "tml-compat-tests"


TRAINER_MODES = ["in-process", "trainer-process"]
"""Every module runs in these; `test_distributed_trainer.py` runs a subset in "distributed-2" (2 ranks)."""


@pytest.fixture(scope="module", params=TRAINER_MODES)
def trainer_mode(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_dir, trainer_mode) -> ServerThread:
    config = ServerConfig(
        port=0,
        data_dir=tmp_path_factory.mktemp("tether-data"),
        long_poll_s=5,
        trainer_process=trainer_mode != "in-process",
        nproc_per_node=2 if trainer_mode == "distributed-2" else 1,
        collective_timeout_s=120,
        log_level="debug" if trainer_mode == "distributed-2" else "info",
    )
    thread = ServerThread(config)
    with thread:
        yield thread


@pytest.fixture(scope="module")
def server_url(server) -> str:
    return server.base_url


@pytest.fixture(scope="module")
def service_client(server_url):
    import tinker

    os.environ["TINKER_TELEMETRY"] = "0"
    client = tinker.ServiceClient(base_url=server_url, api_key=API_KEY)
    yield client
    client.close("success")


@pytest.fixture(scope="module")
def rest_client(server_url):
    import tinker

    return tinker.RestClient(base_url=server_url, api_key=API_KEY)
