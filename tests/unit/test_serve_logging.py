"""`tether serve` at the default log level leaves out httpx's line per request the server sends
itself (a deployment's status polls filled the log), as uvicorn's access log is left out; debug keeps it."""

from __future__ import annotations

import logging

import pytest

from tether.server.main import configure_logging


@pytest.mark.parametrize(("level", "shown"), [("info", False), ("warning", False), ("debug", True)])
def test_httpx_request_lines_only_at_debug(level, shown):
    httpx_logger = logging.getLogger("httpx")
    before = httpx_logger.level
    try:
        configure_logging(level)
        assert httpx_logger.level == (logging.DEBUG if shown else logging.WARNING)
    finally:
        httpx_logger.setLevel(before)
