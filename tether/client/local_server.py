"""An embedded tether server for notebooks and tests: `ServiceClient(base_url="local")`.

The server runs as a child process (`python -m tether serve --port 0 --ready-file F`), never
imported: the SDK layer must not depend on the server layer, and a separate process keeps the
user's interpreter free of server threads and model memory. The server writes its base URL to the
ready file once it accepts requests; the child is stopped on `stop()` or at interpreter exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tether.types.errors import ServerError

log = logging.getLogger("tether.client")

STARTUP_TIMEOUT_S = 180.0


class LocalServer:
    """A `tether serve` child process on a free loopback port."""

    def __init__(
        self,
        *,
        data_dir: str | Path | None = None,
        extra_args: list[str] | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="tether-local-"))
        self.data_dir = Path(data_dir) if data_dir is not None else self._tmp / "data"
        ready_file = self._tmp / "ready"
        self.log_path = self._tmp / "server.log"
        command = [
            sys.executable, "-m", "tether", "serve",
            "--port", "0",
            "--ready-file", str(ready_file),
            "--data-dir", str(self.data_dir),
            *(extra_args or []),
        ]  # fmt: skip
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self._process = subprocess.Popen(
            command, stdout=self._log_file, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
        atexit.register(self.stop)
        self.base_url = self._wait_ready(ready_file, startup_timeout_s)

    def _wait_ready(self, ready_file: Path, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready_file.exists():
                url = ready_file.read_text().strip()
                if url:
                    return url
            if self._process.poll() is not None:
                tail = self._tail()
                self.stop()
                raise ServerError(
                    f"the local tether server exited with code {self._process.returncode}:\n{tail}"
                )
            time.sleep(0.05)
        tail = self._tail()
        self.stop()
        raise ServerError(f"the local tether server did not become ready within {timeout_s:.0f} s:\n{tail}")

    def _tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL after 10 s) and remove its temporary files."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if not self._log_file.closed:
            self._log_file.close()
        atexit.unregister(self.stop)
        shutil.rmtree(self._tmp, ignore_errors=True)
