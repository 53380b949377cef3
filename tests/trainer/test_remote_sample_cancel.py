"""Cancelling a `Sample` op of a `RemoteTrainer` (a `tether trainer` across a socket) stops it in the
trainer process's sampling engine: generation stops, the KV reservation is freed, the op is answered
as cancelled, and the process keeps serving. Only `Sample` ops are cancellable.

The trainer serves on a thread of this process (`serve_trainer(trainer=...)`), so the test can hold
its engine's generation in a token callback until the engine's future is cancelled, and then wait
on the engine's stats. No sleeps.
"""

from __future__ import annotations

import concurrent.futures
import socket
import threading

import msgpack
import pytest

from tests.trainer.test_sample_cancel import WAIT_S, hold_generation, sample
from tests.trainer.test_trainer_modes import read_answer
from tether.trainer.config import EngineSettings, TrainerConfig
from tether.trainer.local import InProcessTrainer
from tether.trainer.process import serve_trainer
from tether.trainer.remote import RemoteTrainer
from tether.types import ops
from tether.types.op_codec import encode_op
from tether.types.wire import AdamParams

BASE = "tether/tiny-qwen3"


@pytest.fixture(scope="module")
def served(tmp_path_factory, default_model_dir):
    """(the trainer serving on a thread of this process, its address); the engine is built."""
    data_dir = tmp_path_factory.mktemp("remote-cancel")
    settings = EngineSettings(data_dir=data_dir, device="cpu", dtype="float32", torch_threads=1)
    trainer = InProcessTrainer(BASE, settings)
    assert len(trainer.submit(sample(3)).result(timeout=WAIT_S).sequences[0].tokens) == 3
    ready = data_dir / "ready"
    config = TrainerConfig(base_model=BASE, ready_file=ready, port=0, **settings.model_dump())
    thread = threading.Thread(target=serve_trainer, args=(config,), kwargs={"trainer": trainer}, daemon=True)
    thread.start()
    listening = threading.Event()
    while not ready.exists():  # the ready file is written by the serving thread once it listens
        listening.wait(0.01)
    host, _, port = ready.read_text().rpartition(":")
    yield trainer, (host, int(port))


def engine_settled(trainer: InProcessTrainer, cancelled: int):
    return trainer.executor.sampling.wait_for_stats(
        lambda s: (
            s.cancelled == cancelled
            and s.running_sequences == 0
            and s.waiting_requests == 0
            and s.reserved_tokens == 0
        ),
        WAIT_S,
    )


def test_cancelling_a_remote_sample_stops_it_in_the_trainer_process(served, monkeypatch):
    trainer, address = served
    engine = trainer.executor.sampling
    before = engine.stats()
    remote = RemoteTrainer(BASE, address)
    try:
        held = hold_generation(engine, monkeypatch, at=2)
        future = remote.submit(sample(100))
        assert held.wait(WAIT_S)
        assert future.cancel() and future.cancelled()
        stats = engine_settled(trainer, before.cancelled + 1)
        assert (stats.completed, stats.failed) == (before.completed, before.failed)
        with pytest.raises(concurrent.futures.CancelledError):
            future.result(0)
        monkeypatch.undo()
        # the process keeps serving this connection: sampling and other ops work
        assert len(remote.submit(sample(4)).result(timeout=WAIT_S).sequences[0].tokens) == 4
        assert remote.submit(ops.DescribeBase()).result(WAIT_S).vocab_size > 0
        assert remote.queued() == 0
    finally:
        remote.close()


def test_training_ops_are_not_cancellable(served):
    trainer, address = served
    remote = RemoteTrainer(BASE, address)
    try:
        remote.submit(ops.CreateModel(model_id="c"), stream="c", seq_id=0)
        step = remote.submit(ops.OptimStep(model_id="c", adam_params=AdamParams()), stream="c", seq_id=1)
        assert not step.cancel()
        assert "grad_norm:mean" in step.result(WAIT_S).metrics
        remote.submit(ops.DeleteModel(model_id="c"), stream="c", seq_id=2).result(WAIT_S)
    finally:
        remote.close()


def _send(conn: socket.socket, envelope: ops.OpEnvelope) -> None:
    conn.sendall(encode_op(envelope))


def test_the_process_answers_a_cancelled_sample_and_ignores_stale_or_bad_cancels(served, monkeypatch):
    """On the wire: the cancelled op is answered as cancelled (the result callback tolerates a
    cancelled future); a cancel of a finished or unknown op is a no-op with no answer; a malformed
    cancel frame fails that frame only."""
    trainer, address = served
    engine = trainer.executor.sampling
    before = engine.stats()
    with socket.create_connection(address) as conn:
        held = hold_generation(engine, monkeypatch, at=2)
        _send(conn, ops.OpEnvelope(op_id=1, op=sample(100)))
        assert held.wait(WAIT_S)
        _send(conn, ops.OpEnvelope(op_id=2, op=ops.CancelSample(target_op_id=1)))
        answered, result = read_answer(conn)
        assert answered == 1 and isinstance(result, ops.OpFailure) and "ancelled" in result.message
        engine_settled(trainer, before.cancelled + 1)
        monkeypatch.undo()

        _send(conn, ops.OpEnvelope(op_id=3, op=sample(2)))
        answered, result = read_answer(conn)
        assert answered == 3 and isinstance(result, ops.SampleOutput)
        _send(conn, ops.OpEnvelope(op_id=4, op=ops.CancelSample(target_op_id=3)))  # finished: no-op
        _send(conn, ops.OpEnvelope(op_id=5, op=ops.CancelSample(target_op_id=999)))  # unknown: no-op
        body = msgpack.packb({"op_id": 6, "op": {"type": "cancel_sample", "target_op_id": "one"}})
        conn.sendall((len(body) + 8).to_bytes(4, "big") + (6).to_bytes(8, "big") + body)
        answered, result = read_answer(conn)  # the first answer after op 3 is the malformed frame's
        assert answered == 6 and isinstance(result, ops.OpFailure) and "malformed" in result.message
        _send(conn, ops.OpEnvelope(op_id=7, op=ops.DescribeBase()))
        answered, result = read_answer(conn)
        assert answered == 7 and isinstance(result, ops.BaseModelInfo)
    assert engine.stats().cancelled == before.cancelled + 1
