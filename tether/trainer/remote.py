"""`RemoteTrainer`: the `Trainer` interface over a socket to a `tether trainer` process.

One TCP connection on loopback carries frames of `tether.types.op_codec` both ways. Ops are
encoded and written by one sender thread in submission order, so the trainer receives each model's
ops in the order the server queued them (its worker then orders them by `seq_id`). A reader thread
matches result frames to futures by op id. A `Sample` op's future stays cancellable while it
runs: cancelling it sends a `CancelSample` frame, and the trainer process stops that engine request
(freeing its KV cache); other ops are marked running once submitted, since a training op must never
stop mid-way. If the process dies, every pending op fails with a
`ServerError` naming the exit, and later submissions fail at once.

Torch-free: the server imports this at module level.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tether.trainer.config import TrainerConfig
from tether.types import ops
from tether.types.errors import ServerError
from tether.types.op_codec import HEADER_SIZE, OpDecodeError, decode_result, encode_op, read_header

log = logging.getLogger("tether.trainer")

_STOP = object()


def recv_exact(sock: socket.socket, size: int) -> bytes | None:
    """Exactly `size` bytes, or None at end of stream."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def recv_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    """One op-codec frame (header, then body): its op id and body, or None at end of stream."""
    header = recv_exact(sock, HEADER_SIZE)
    if header is None:
        return None
    length, op_id = read_header(header)
    body = recv_exact(sock, length)
    return None if body is None else (op_id, body)


class RemoteTrainer:
    """A connection to one `tether trainer` process (one base model)."""

    def __init__(
        self, base_model: str, address: tuple[str, int], process: subprocess.Popen | None = None
    ) -> None:
        self.base_model = base_model
        self.process = process
        self._sock = socket.create_connection(address, timeout=30)
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._dead: str | None = None
        self._sender = threading.Thread(
            target=self._send_loop, name=f"tether-remote-send-{base_model}", daemon=True
        )
        self._reader = threading.Thread(
            target=self._read_loop, name=f"tether-remote-read-{base_model}", daemon=True
        )
        self._sender.start()
        self._reader.start()

    @classmethod
    def spawn(cls, config: TrainerConfig, *, startup_timeout_s: float = 900.0) -> RemoteTrainer:
        """Start `python -m tether.trainer.process` for `config.base_model` and connect to it.

        Raises `ServerError` with the process's last output if it exits or does not listen in time.
        """
        workdir = Path(tempfile.mkdtemp(prefix="tether-trainer-"))
        ready = workdir / "ready"
        config_file = workdir / "config.json"
        config_file.write_text(config.model_copy(update={"ready_file": ready, "port": 0}).model_dump_json())
        log_file = open(workdir / "trainer.log", "wb")  # noqa: SIM115 - the child writes it for its lifetime
        command = [sys.executable, "-m", "tether.trainer.process", str(config_file)]
        if config.nproc_per_node > 1:  # torchrun starts the ranks; rank 0 serves the socket
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                str(config.nproc_per_node),
                "--standalone",
                "-m",
                "tether.trainer.process",
                str(config_file),
            ]
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + startup_timeout_s
        while not ready.exists():
            if process.poll() is not None:
                tail = (workdir / "trainer.log").read_text(errors="replace")[-2000:]
                raise ServerError(
                    f"trainer process for {config.base_model!r} exited with {process.returncode}: {tail}"
                )
            if time.monotonic() > deadline:
                process.kill()
                raise ServerError(
                    f"trainer process for {config.base_model!r} did not start in {startup_timeout_s:.0f} s"
                )
            time.sleep(0.02)
        host, _, port = ready.read_text().rpartition(":")
        return cls(config.base_model, (host, int(port)), process)

    # ---- the Trainer interface ---------------------------------------------------------------

    def submit(
        self, op: ops.Op, *, stream: str | None = None, seq_id: int | None = None
    ) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._dead is not None:
                future.set_exception(ServerError(self._dead))
                return future
            op_id = next(self._ids)
            if not isinstance(op, ops.Sample):
                future.set_running_or_notify_cancel()  # sent ops run: a cancel can no longer stop them
            self._pending[op_id] = future
            self._outbox.put(ops.OpEnvelope(op_id=op_id, stream=stream, seq_id=seq_id, op=op))
        if isinstance(op, ops.Sample):

            def cancelled(done: concurrent.futures.Future) -> None:
                if done.cancelled():
                    self._cancel(op_id)

            future.add_done_callback(cancelled)
        return future

    def _cancel(self, op_id: int) -> None:
        """The sample `op_id` was cancelled here: forget it and tell the trainer process to stop it."""
        with self._lock:
            if self._pending.pop(op_id, None) is None or self._dead is not None:
                return
            cancel_id = next(self._ids)
            self._outbox.put(ops.OpEnvelope(op_id=cancel_id, op=ops.CancelSample(target_op_id=op_id)))

    def queued(self) -> int:
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        self._outbox.put(_STOP)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if self.process is not None:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
        self._fail_all("trainer closed")

    # ---- threads -----------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            envelope = self._outbox.get()
            if envelope is _STOP:
                return
            try:
                frame = encode_op(envelope)
            except Exception as exc:  # noqa: BLE001 - an op that cannot be encoded fails alone
                self._resolve(envelope.op_id, ops.OpFailure.from_exception(exc))
                continue
            try:
                self._sock.sendall(frame)
            except OSError as exc:
                self._fail_all(f"lost the trainer process for {self.base_model!r}: {exc}")
                return

    def _read_loop(self) -> None:
        try:
            while (frame := recv_frame(self._sock)) is not None:
                op_id, body = frame
                try:
                    result = decode_result(op_id, body).result
                except OpDecodeError as exc:
                    result = ops.OpFailure(error_type="ServerError", message=str(exc))
                self._resolve(op_id, result)
        except (OSError, ValueError) as exc:
            log.warning("trainer connection for %r broke: %s", self.base_model, exc)
        code = self.process.poll() if self.process is not None else None
        self._fail_all(
            f"the trainer process for {self.base_model!r} exited"
            + (f" with {code}" if code is not None else "")
        )

    def _resolve(self, op_id: int, result: object) -> None:
        with self._lock:
            future = self._pending.pop(op_id, None)
        if future is None:
            return
        try:
            if isinstance(result, ops.OpFailure):
                future.set_exception(result.to_exception())
            else:
                future.set_result(result)
        except concurrent.futures.InvalidStateError:  # a sample cancelled meanwhile
            pass

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = reason
            pending, self._pending = self._pending, {}
        for future in pending.values():
            try:
                future.set_exception(ServerError(reason))
            except concurrent.futures.InvalidStateError:  # a sample cancelled meanwhile
                pass
