"""Warm start: `tether serve` loads its base models at start-up, and says ready only when they can serve."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from tether.server.config import ServerConfig
from tether.server.main import ServerThread

BASE = "tether/tiny-qwen3"


def test_models_load_at_start_up_before_any_request(tmp_path, default_model_dir):
    with ServerThread(ServerConfig(port=0, data_dir=tmp_path)) as url:
        deadline = time.monotonic() + 120
        while (answer := httpx.get(f"{url}/api/v1/healthz")).status_code == 503:
            assert answer.json()["models"][BASE] == "loading"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert answer.status_code == 200 and answer.json()["models"] == {BASE: "ready"}


def test_a_model_that_cannot_load_keeps_the_server_unready_and_says_why(tmp_path):
    missing = str(tmp_path / "no-such-model")
    server = ServerThread(ServerConfig(port=0, data_dir=tmp_path / "data", models=[missing]))
    with server as url:
        assert server.app.state.tether.trainers.warm.wait(120)
        answer = httpx.get(f"{url}/api/v1/healthz")
        assert answer.status_code == 503
        assert answer.json()["models"][missing].startswith("failed: ")


def test_the_ready_file_appears_only_once_the_model_is_loaded(tmp_path, default_model_dir):
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tether",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path),
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        answer = httpx.get(f"{ready.read_text()}/api/v1/healthz")
        assert answer.status_code == 200 and answer.json()["models"] == {BASE: "ready"}
    finally:
        process.terminate()
        process.wait(30)
