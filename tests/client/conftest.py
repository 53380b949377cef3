"""A tether server for the SDK tests: one per test session, in a thread, serving the tiny default model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tether.client import ServiceClient

MODEL = "tether/tiny-qwen3"


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory, default_model_dir) -> Iterator[str]:
    from tether.server.config import ServerConfig
    from tether.server.main import ServerThread

    config = ServerConfig(
        port=0, data_dir=tmp_path_factory.mktemp("server-data"), long_poll_s=5.0, log_level="warning"
    )
    with ServerThread(config) as url:
        yield url


@pytest.fixture()
def service(server_url: str) -> Iterator[ServiceClient]:
    client = ServiceClient(base_url=server_url, api_key="tml-test")
    yield client
    client.close()
