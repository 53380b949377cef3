"""The `tether trainer` process: one base model's `InProcessTrainer` behind an op socket.

It listens on `host:port` (loopback by default), writes `host:port` to the ready file once
listening, and serves each connection with frames of `tether.types.op_codec`: a reader thread
decodes ops and submits them in arrival order; a sender thread writes results as they complete.
A frame whose body is not a valid op fails that one op (`OpFailure`), never the process.
A `CancelSample` frame cancels a `Sample` op of the same connection that is still in flight (its
engine request stops and frees its KV cache); the op is answered `OpFailure("Cancelled")`.

`python -m tether.trainer.process CONFIG.json` is how `tether serve --trainer-process` starts it
(exiting when the server's connection closes); `tether trainer --base-model ...` runs it standalone.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import queue
import socket
import sys
import threading
from pathlib import Path

from tether.trainer.config import TrainerConfig
from tether.trainer.local import InProcessTrainer
from tether.trainer.remote import recv_frame
from tether.types import ops
from tether.types.op_codec import OpDecodeError, decode_op, encode_result

log = logging.getLogger("tether.trainer")


def serve_connection(conn: socket.socket, trainer: InProcessTrainer) -> None:
    """Serve one connection until it closes."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    outbox: queue.SimpleQueue = queue.SimpleQueue()

    def send_loop() -> None:
        while True:
            envelope = outbox.get()
            if envelope is None:
                return
            try:
                frame = encode_result(envelope)
            except Exception as exc:  # noqa: BLE001 - a result that cannot be encoded fails its op
                frame = encode_result(
                    ops.ResultEnvelope(op_id=envelope.op_id, result=ops.OpFailure.from_exception(exc))
                )
            try:
                conn.sendall(frame)
            except OSError:
                return

    sender = threading.Thread(target=send_loop, name="tether-trainer-send", daemon=True)
    sender.start()

    samples: dict[int, concurrent.futures.Future] = {}  # Sample ops in flight, by op id
    samples_lock = threading.Lock()

    def answer(op_id: int, future_or_failure: object) -> None:
        if isinstance(future_or_failure, ops.OpFailure):
            outbox.put(ops.ResultEnvelope(op_id=op_id, result=future_or_failure))
            return
        future = future_or_failure
        assert isinstance(future, concurrent.futures.Future)
        with samples_lock:
            samples.pop(op_id, None)
        if future.cancelled():
            result: object = ops.OpFailure(
                error_type="ServerError", message="Cancelled: the op was cancelled"
            )
        elif (exc := future.exception()) is not None:
            result = ops.OpFailure.from_exception(exc)
        else:
            result = future.result()
        outbox.put(ops.ResultEnvelope(op_id=op_id, result=result))

    def cancel(target_op_id: int) -> None:
        with samples_lock:
            future = samples.get(target_op_id)
        if future is not None:  # finished (or never a Sample of this connection): nothing to stop
            future.cancel()

    try:
        while (frame := recv_frame(conn)) is not None:
            op_id, body = frame
            try:
                envelope = decode_op(op_id, body)
                if isinstance(envelope.op, ops.CancelSample):
                    cancel(envelope.op.target_op_id)
                    continue
                future = trainer.submit(envelope.op, stream=envelope.stream, seq_id=envelope.seq_id)
            except OpDecodeError as exc:
                answer(op_id, ops.OpFailure(error_type="ServerError", message=str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - a refused op fails alone
                answer(op_id, ops.OpFailure.from_exception(exc))
                continue
            if isinstance(envelope.op, ops.Sample):
                with samples_lock:
                    samples[op_id] = future
            future.add_done_callback(functools.partial(answer, op_id))
    except (OSError, ValueError) as exc:
        log.warning("op connection broke: %s", exc)
    finally:
        outbox.put(None)
        conn.close()


def serve_trainer(
    config: TrainerConfig, *, exit_on_disconnect: bool = False, trainer: InProcessTrainer | None = None
) -> None:
    """Run the trainer until interrupted (or, with `exit_on_disconnect`, until its first client leaves).

    `trainer` (default: an `InProcessTrainer` of `config`) is what serves the ops: rank 0 of a
    multi-rank trainer passes its own (`tether.trainer.distributed`).
    """
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if trainer is None:
        trainer = InProcessTrainer(config.base_model, config.engine_settings())
    listener = socket.create_server((config.host, config.port))
    host, port = listener.getsockname()[:2]
    print(f"tether trainer: {config.base_model} listening on {host}:{port}", flush=True)
    if config.ready_file is not None:
        ready = Path(config.ready_file)
        tmp = ready.with_name(ready.name + ".tmp")
        tmp.write_text(f"{host}:{port}")
        os.replace(tmp, ready)
    try:
        while True:
            conn, _ = listener.accept()
            if exit_on_disconnect:
                serve_connection(conn, trainer)
                return
            threading.Thread(target=serve_connection, args=(conn, trainer), daemon=True).start()
    finally:
        listener.close()
        trainer.close()


def main(config: TrainerConfig) -> int:
    """`tether trainer`: serve ops for one base model (on `nproc_per_node` ranks: through torchrun)."""
    if _under_torchrun():
        from tether.trainer.distributed import serve_distributed

        serve_distributed(config)
        return 0
    if config.nproc_per_node > 1:
        import subprocess
        import tempfile

        from tether.trainer.distributed import torchrun_command

        config_file = Path(tempfile.mkdtemp(prefix="tether-trainer-")) / "config.json"
        config_file.write_text(config.model_dump_json())
        return subprocess.call(torchrun_command(config_file, config.nproc_per_node, exit_on_disconnect=False))
    serve_trainer(config)
    return 0


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


if __name__ == "__main__":
    _config = TrainerConfig.model_validate_json(Path(sys.argv[1]).read_text())
    if _under_torchrun():
        from tether.trainer.distributed import serve_distributed

        serve_distributed(_config, exit_on_disconnect=True)
    else:
        serve_trainer(_config, exit_on_disconnect=True)
