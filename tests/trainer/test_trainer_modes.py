"""The two trainers carry the same ops: results are bit-identical in and out of process (CPU fp32),
and the process boundary fails a malformed op alone, never the trainer process."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from tether.trainer.config import EngineSettings, TrainerConfig
from tether.trainer.local import InProcessTrainer
from tether.trainer.process import serve_trainer
from tether.trainer.remote import RemoteTrainer, recv_frame
from tether.types import ops
from tether.types.errors import NotFoundError, ServerError, UserInputError
from tether.types.op_codec import decode_result, encode_op
from tether.types.wire import AdamParams, LoraConfig, SamplingParams

BASE = "tether/tiny-qwen3"


def _settings(data_dir: Path) -> EngineSettings:
    return EngineSettings(data_dir=data_dir, device="cpu", dtype="float32", torch_threads=1)


def _datum(seed: int, n: int = 12) -> ops.TrainingDatum:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 250, size=n + 1)
    return ops.TrainingDatum(
        input_tokens=tokens[:-1].astype(np.int64),
        loss_fn_inputs={
            "target_tokens": tokens[1:].astype(np.int64),
            "weights": rng.random(n).astype(np.float32),
        },
    )


def _script(model: str) -> list[tuple[ops.Op, str | None, int | None]]:
    data = [_datum(1), _datum(2, 7)]
    rl = [
        ops.TrainingDatum(
            input_tokens=d.input_tokens,
            loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "logprobs": np.full(len(d.input_tokens), -3.0, np.float32),
                "advantages": np.linspace(-1, 1, len(d.input_tokens)).astype(np.float32),
            },
        )
        for d in data
    ]
    adam = AdamParams(learning_rate=1e-2)
    return [
        (ops.CreateModel(model_id=model, lora_config=LoraConfig(rank=4, seed=3)), model, None),
        (ops.ForwardBackward(model_id=model, data=data, loss_fn="cross_entropy"), model, 1),
        (ops.OptimStep(model_id=model, adam_params=adam), model, 2),
        (ops.ForwardBackward(model_id=model, data=rl, loss_fn="ppo"), model, 3),
        (ops.OptimStep(model_id=model, adam_params=adam), model, 4),
        (ops.ForwardKeepGraph(model_id=model, data=data, graph_id="g1", ttl_s=60), model, 5),
        (
            ops.BackwardFromLogprobGrads(
                model_id=model,
                graph_id="g1",
                logprob_grads=[np.full(12, -0.5, np.float32), np.full(7, 0.25, np.float32)],
            ),
            model,
            6,
        ),
        (ops.OptimStep(model_id=model, adam_params=adam), model, 7),
        (ops.Forward(model_id=model, data=data, loss_fn="cross_entropy"), model, 8),
        (ops.SaveSamplerWeights(model_id=model, kind="ephemeral", owner="o", sampler_id="s1"), model, 9),
        (
            ops.Sample(
                sampler_id="s1",
                prompt_tokens=[5, 6, 7],
                num_samples=2,
                include_prompt_logprobs=True,
                sampling_params=SamplingParams(max_tokens=6, seed=11),
            ),
            None,
            None,
        ),
        (ops.CreateModel(model_id="full"), "full", None),
        (ops.ForwardBackward(model_id="full", data=data, loss_fn="cross_entropy"), "full", 1),
        (ops.OptimStep(model_id="full", adam_params=adam), "full", 2),
        (ops.Forward(model_id="full", data=data, loss_fn="cross_entropy"), "full", 3),
    ]


def _run(trainer, script) -> list:
    """Ordered ops are pipelined; an unordered op (sampling) waits for the ops before it."""
    futures = []
    for op, stream, seq in script:
        if stream is None:
            for earlier in futures:
                earlier.result(timeout=300)
        futures.append(trainer.submit(op, stream=stream, seq_id=seq))
    return [f.result(timeout=300) for f in futures]


def _same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, ops.ForwardOutput):
        assert a.metrics == b.metrics
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert x.keys() == y.keys()
            for key in x:
                assert x[key].dtype == y[key].dtype and x[key].tobytes() == y[key].tobytes()
    else:
        assert a == b


@pytest.fixture(scope="module")
def remote(tmp_path_factory, default_model_dir):
    config = TrainerConfig(base_model=BASE, **_settings(tmp_path_factory.mktemp("remote")).model_dump())
    trainer = RemoteTrainer.spawn(config)
    yield trainer
    trainer.close()


def test_results_are_bit_identical_in_and_out_of_process(tmp_path, remote):
    local = InProcessTrainer(BASE, _settings(tmp_path / "local"))
    try:
        here = _run(local, _script("m"))
    finally:
        local.close()
    there = _run(remote, _script("m"))
    assert len(here) == len(there)
    for a, b in zip(here, there, strict=True):
        _same(a, b)
    assert isinstance(here[-1], ops.ForwardOutput) and here[-1].metrics["loss:sum"] > 0


def test_errors_cross_the_boundary_as_the_same_types(remote):
    with pytest.raises(NotFoundError):
        remote.submit(
            ops.OptimStep(model_id="nobody", adam_params=AdamParams()), stream="nobody", seq_id=1
        ).result(60)
    remote.submit(ops.CreateModel(model_id="e", lora_config=LoraConfig(rank=2)), stream="e").result(60)
    bad = ops.ForwardBackward(model_id="e", data=[_datum(3)], loss_fn="dro")  # dro needs beta and RL inputs
    with pytest.raises(UserInputError):
        remote.submit(bad, stream="e", seq_id=1).result(60)
    good = ops.ForwardBackward(model_id="e", data=[_datum(3)], loss_fn="cross_entropy")
    assert remote.submit(good, stream="e", seq_id=2).result(60).metrics["loss:sum"] > 0  # still usable


@pytest.fixture()
def trainer_socket(tmp_path, default_model_dir):
    """A trainer serving on a thread of this process, and a raw connection to it."""
    ready = tmp_path / "ready"
    config = TrainerConfig(
        base_model=BASE,
        ready_file=ready,
        **_settings(tmp_path).model_dump(exclude={"data_dir"}),
        data_dir=tmp_path,
    )
    threading.Thread(target=serve_trainer, args=(config,), daemon=True).start()
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    host, _, port = ready.read_text().rpartition(":")
    with socket.create_connection((host, int(port))) as conn:
        yield conn


def read_answer(conn: socket.socket) -> tuple[int, ops.OpResult]:
    """The next answer a trainer process sends on `conn`: its op id and result."""
    frame = recv_frame(conn)
    assert frame is not None
    op_id, body = frame
    return op_id, decode_result(op_id, body).result


def test_a_malformed_op_fails_alone_and_the_process_keeps_serving(trainer_socket):
    conn = trainer_socket
    for op_id, body in [
        (77, b"\xc1 garbage"),
        (78, msgpack.packb({"op_id": 78, "op": {"type": "rm_rf"}})),
        (79, msgpack.packb({"op_id": 79, "op": {"type": "sample", "sampler_id": None}})),
    ]:
        conn.sendall(len(body + b"12345678").to_bytes(4, "big") + op_id.to_bytes(8, "big") + body)
        answered, result = read_answer(conn)
        assert answered == op_id and isinstance(result, ops.OpFailure) and "malformed" in result.message
    conn.sendall(encode_op(ops.OpEnvelope(op_id=80, op=ops.DescribeBase())))
    answered, result = read_answer(conn)
    assert answered == 80 and isinstance(result, ops.BaseModelInfo) and result.vocab_size > 0


def test_a_dead_trainer_process_fails_pending_and_later_ops_at_once(tmp_path, default_model_dir):
    config = TrainerConfig(base_model=BASE, **_settings(tmp_path).model_dump())
    trainer = RemoteTrainer.spawn(config)
    try:
        assert trainer.submit(ops.DescribeBase()).result(120).vocab_size > 0
        assert trainer.process is not None
        trainer.process.kill()
        trainer.process.wait(30)
        with pytest.raises(ServerError, match="exited"):
            trainer.submit(ops.DescribeBase()).result(30)
    finally:
        trainer.close()
