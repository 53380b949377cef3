"""One embedded tether server (`ServiceClient(base_url="local")`) shared by the end-to-end recipe tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def local_service(tmp_path_factory):
    from tether.client import ServiceClient

    service = ServiceClient(base_url="local", local_data_dir=tmp_path_factory.mktemp("server-data"))
    yield service
    service.close()
