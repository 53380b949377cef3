"""A 2-rank trainer (torchrun, gloo) behind the op socket: the same answers as the in-process trainer,
errors that fail one op and leave every rank usable, and a SIGKILLed rank that ends the trainer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from test_trainer_modes import BASE, _datum, _run, _script, _settings

from tether.trainer.config import TrainerConfig
from tether.trainer.local import InProcessTrainer
from tether.trainer.remote import RemoteTrainer
from tether.types import ops
from tether.types.errors import ConflictError, NotFoundError, ServerError, UserInputError
from tether.types.wire import AdamParams, LoraConfig


def _config(data_dir) -> TrainerConfig:
    return TrainerConfig(base_model=BASE, **{**_settings(data_dir).model_dump(), "nproc_per_node": 2})


@pytest.fixture(scope="module")
def two_ranks_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("two-ranks")


@pytest.fixture(scope="module")
def two_ranks(two_ranks_dir, default_model_dir):
    trainer = RemoteTrainer.spawn(_config(two_ranks_dir), startup_timeout_s=300)
    yield trainer
    trainer.close()


def _close(a, b, tol: float = 1e-5) -> None:
    assert type(a) is type(b)
    if isinstance(a, ops.ForwardOutput):
        assert a.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], rel=tol)
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert x.keys() == y.keys()
            for key in x:
                np.testing.assert_allclose(x[key], y[key], rtol=tol, atol=tol)
    elif isinstance(a, ops.MetricsOutput):
        assert a.metrics.keys() == b.metrics.keys()
        for key in a.metrics:
            assert a.metrics[key] == pytest.approx(b.metrics[key], rel=1e-5, abs=1e-6)
    elif isinstance(a, ops.SampleOutput):
        for x, y in zip(a.sequences, b.sequences, strict=True):
            assert x.tokens == y.tokens
            np.testing.assert_allclose(x.logprobs, y.logprobs, rtol=1e-4, atol=1e-4)
    else:
        assert a == b


def test_two_rank_trainer_answers_like_the_in_process_one(tmp_path, two_ranks):
    local = InProcessTrainer(BASE, _settings(tmp_path / "local"))
    try:
        here = _run(local, _script("m"))
    finally:
        local.close()
    there = _run(two_ranks, _script("m"))
    assert len(here) == len(there)
    for a, b in zip(here[:-1], there[:-1], strict=True):
        _close(a, b)
    # after the full copy's first AdamW step: Adam's first update is g/|g| elementwise, so the last bits
    # of near-cancelling gradient sums (summed in another order across ranks) move a few weights by
    # ~lr; the engine test checks full fine-tuning weights to 1e-5 on a model without that effect
    _close(here[-1], there[-1], tol=1e-3)


def test_errors_fail_one_op_and_every_rank_stays_usable(two_ranks):
    with pytest.raises(NotFoundError):
        two_ranks.submit(
            ops.OptimStep(model_id="nobody", adam_params=AdamParams()), stream="nobody", seq_id=1
        ).result(60)
    two_ranks.submit(ops.CreateModel(model_id="e", lora_config=LoraConfig(rank=2)), stream="e").result(120)
    bad = ops.ForwardBackward(
        model_id="e", data=[_datum(3)], loss_fn="dro"
    )  # found on every rank before any collective
    with pytest.raises(UserInputError):
        two_ranks.submit(bad, stream="e", seq_id=1).result(60)
    save = ops.SaveState(model_id="e", owner="o", path="tinker://e/weights/one", overwrite=False)
    assert isinstance(two_ranks.submit(save, stream="e", seq_id=2).result(120), ops.CheckpointWritten)
    with pytest.raises(ConflictError):  # rank 0 alone fails the write; the op changed no state
        two_ranks.submit(save, stream="e", seq_id=3).result(120)
    good = ops.ForwardBackward(model_id="e", data=[_datum(3), _datum(4, 5)], loss_fn="cross_entropy")
    assert (
        two_ranks.submit(good, stream="e", seq_id=4).result(120).metrics["loss:sum"] > 0
    )  # still in lock-step
    step = ops.OptimStep(model_id="e", adam_params=AdamParams(learning_rate=1e-3))
    assert two_ranks.submit(step, stream="e", seq_id=5).result(120).metrics["grad_norm:mean"] > 0


def test_a_sigkilled_rank_ends_the_trainer_with_a_clear_error(tmp_path, default_model_dir):
    trainer = RemoteTrainer.spawn(_config(tmp_path), startup_timeout_s=300)
    try:
        trainer.submit(ops.CreateModel(model_id="k", lora_config=LoraConfig(rank=2)), stream="k").result(120)
        ranks = subprocess.run(
            ["pgrep", "-P", str(trainer.process.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(ranks) == 2
        os.kill(int(max(ranks, key=int)), signal.SIGKILL)
        trainer.process.wait(timeout=120)  # torchrun's agent sees the dead rank and stops the other
        assert trainer.process.returncode != 0
        deadline = time.monotonic() + 30
        future = trainer.submit(
            ops.Forward(model_id="k", data=[_datum(1)], loss_fn="cross_entropy"), stream="k"
        )
        with pytest.raises(ServerError, match="exited"):
            future.result(max(1.0, deadline - time.monotonic()))
        log = trainer.process.args[-1].rsplit("/", 1)[0] + "/trainer.log"
        assert "SIGKILL" in open(log).read() or "Signal 9" in open(log).read()
    finally:
        trainer.close()


@pytest.mark.parametrize("lora", [LoraConfig(rank=4, seed=1), None], ids=["lora", "full"])
def test_state_moves_from_two_ranks_to_one_and_back_and_continues(two_ranks, two_ranks_dir, lora):
    """save_state on 2 ranks -> load on 1 (optimizer included) -> same next-step loss; and 1 -> 2."""
    name = "resume-" + ("lora" if lora else "full")
    data = [_datum(5), _datum(6, 9), _datum(7, 4)]
    adam = AdamParams(learning_rate=1e-3)

    def fb(trainer, model, seq):
        op = ops.ForwardBackward(model_id=model, data=data, loss_fn="cross_entropy")
        return trainer.submit(op, stream=model, seq_id=seq).result(180).metrics["loss:sum"]

    def step(trainer, model, seq):
        trainer.submit(ops.OptimStep(model_id=model, adam_params=adam), stream=model, seq_id=seq).result(180)

    def save(trainer, model, path, seq):
        op = ops.SaveState(model_id=model, owner="o", path=path)
        written = trainer.submit(op, stream=model, seq_id=seq).result(180)
        assert isinstance(written, ops.CheckpointWritten)
        return Path(written.directory)

    def load(trainer, model, path):
        op = ops.LoadState(model_id=model, owner="o", path=path, include_optimizer=True, create_model=True)
        trainer.submit(op, stream=model).result(180)

    two_ranks.submit(ops.CreateModel(model_id=name, lora_config=lora), stream=name).result(180)
    fb(two_ranks, name, 1), step(two_ranks, name, 2)
    directory = save(two_ranks, name, f"tinker://{name}/weights/two", 3)
    on_two = [fb(two_ranks, name, 4)]
    step(two_ranks, name, 5)
    on_two.append(fb(two_ranks, name, 6))

    # the 2-rank save is a DCP checkpoint both ranks wrote shards of
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["layout"]["dcp"] == "dcp" and manifest["layout"]["ranks"] == 2
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(manifest["files"])

    one = InProcessTrainer(BASE, _settings(two_ranks_dir))
    try:
        load(one, name, f"tinker://{name}/weights/two")
        on_one = [fb(one, name, 1)]
        step(one, name, 2)
        on_one.append(fb(one, name, 3))
        assert on_one == pytest.approx(on_two, rel=1e-5)  # 2 -> 1 continues like it never stopped
        save(one, name, f"tinker://{name}/weights/one", 4)
        after_one = fb(one, name, 5)
    finally:
        one.close()
    back = name + "-back"
    load(two_ranks, back, f"tinker://{name}/weights/one")
    assert fb(two_ranks, back, 1) == pytest.approx(after_one, rel=1e-5)  # 1 -> 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_loopback_serve_a_server(tmp_path, default_model_dir):
    """Two torchrun invocations (`--nnodes 2`, c10d rendezvous on 127.0.0.1) form one trainer that
    `tether serve --trainer-addresses` drives, as the README's multi-node example does."""
    import sys

    ready, port, rdzv = tmp_path / "ready", _free_port(), _free_port()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{rdzv}",
        "--rdzv-id",
        "tether-test",
        "-m",
        "tether.cli",
        "trainer",
        "--base-model",
        BASE,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--torch-threads",
        "1",
        "--data-dir",
        str(tmp_path / "data"),
        "--port",
        str(port),
        "--ready-file",
        str(ready),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    logs = [open(tmp_path / f"node{i}.log", "w") for i in range(2)]  # noqa: SIM115 - closed below
    nodes = [
        subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        for log in logs
    ]
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), (
                "trainer did not start: " + (tmp_path / "node0.log").read_text()[-2000:]
            )
            time.sleep(0.1)
        from tether.server.config import ServerConfig
        from tether.server.main import ServerThread

        config = ServerConfig(
            port=0, data_dir=tmp_path / "server", trainer_addresses={BASE: f"127.0.0.1:{port}"}
        )
        server = ServerThread(config)
        with server:
            import tinker
            from tinker import types

            client = tinker.ServiceClient(base_url=server.base_url, api_key="tml-two-nodes")
            training = client.create_lora_training_client(base_model=BASE, rank=2, seed=0).result()
            ids = list(b"two nodes, one trainer")
            datum = types.Datum(
                model_input=types.ModelInput.from_ints(ids[:-1]),
                loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
            )
            first = training.forward_backward([datum, datum], "cross_entropy").result().metrics["loss:sum"]
            training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            second = training.forward([datum, datum], "cross_entropy").result().metrics["loss:sum"]
            assert second < first
            client.close("success")
    finally:
        for node in nodes:
            os.killpg(node.pid, signal.SIGTERM)
        for node, log in zip(nodes, logs, strict=True):
            node.wait(timeout=60)
            log.close()


def test_a_kept_graph_expires_on_every_rank_by_rank_zeros_clock(two_ranks):
    model, data = "ttl", [_datum(1), _datum(2, 7)]
    grads = [np.full(12, -0.5, np.float32), np.full(7, 0.25, np.float32)]
    two_ranks.submit(ops.CreateModel(model_id=model, lora_config=LoraConfig(rank=2)), stream=model).result(
        120
    )
    keep = ops.ForwardKeepGraph(model_id=model, data=data, graph_id="short", ttl_s=0.2)
    two_ranks.submit(keep, stream=model, seq_id=1).result(120)
    time.sleep(2.5)  # rank 0's worker frees expired graphs about once a second when idle
    late = ops.BackwardFromLogprobGrads(model_id=model, graph_id="short", logprob_grads=grads)
    with pytest.raises(NotFoundError):
        two_ranks.submit(late, stream=model, seq_id=2).result(120)
    keep = ops.ForwardKeepGraph(model_id=model, data=data, graph_id="long", ttl_s=600)
    two_ranks.submit(keep, stream=model, seq_id=3).result(120)
    done = ops.BackwardFromLogprobGrads(model_id=model, graph_id="long", logprob_grads=grads)
    assert two_ranks.submit(done, stream=model, seq_id=4).result(120).metrics["loss:sum"] != 0
    step = ops.OptimStep(model_id=model, adam_params=AdamParams(learning_rate=1e-3))
    assert two_ranks.submit(step, stream=model, seq_id=5).result(120).metrics["grad_norm:mean"] > 0


def test_a_damaged_dcp_checkpoint_fails_the_load_on_every_rank_and_the_trainer_goes_on(two_ranks):
    """Rank 0 alone reads every byte to check the sha256s (each rank then reads only its slices);
    it tells the others, so all fail the op alike and stay in lock-step."""
    from tether.types.errors import DamagedDataError

    model = "damaged"
    two_ranks.submit(ops.CreateModel(model_id=model, lora_config=LoraConfig(rank=2)), stream=model).result(
        120
    )
    save = ops.SaveState(model_id=model, owner="o", path=f"tinker://{model}/weights/a")
    directory = Path(two_ranks.submit(save, stream=model, seq_id=1).result(120).directory)
    shard = directory / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    shard.write_bytes(bytes(data))
    load = ops.LoadState(
        model_id=model,
        owner="o",
        path=f"tinker://{model}/weights/a",
        include_optimizer=True,
        create_model=False,
    )
    with pytest.raises(DamagedDataError, match="sha256"):
        two_ranks.submit(load, stream=model, seq_id=2).result(120)
    forward = ops.Forward(model_id=model, data=[_datum(3)], loss_fn="cross_entropy")
    assert two_ranks.submit(forward, stream=model, seq_id=3).result(120).metrics["loss:sum"] > 0
