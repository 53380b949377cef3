"""Many tenants, each with its own tinker SDK session, queue their steps together on one base model
(so the trainer fuses their forward_backwards); one tenant's data is bad and another's session
ends with its ops still queued. Every other tenant's losses, logprobs and steps equal a run of the
same model alone; the bad one's op fails naming the field and datum; the server goes on serving."""

from __future__ import annotations

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from tether.server.config import ServerConfig  # noqa: E402
from tether.server.main import ServerThread  # noqa: E402

BASE = "tether/tiny-qwen3"
SPECS = [
    {"rank": 2, "seed": 1},
    {"rank": 8, "seed": 2, "train_mlp": False},
    {"rank": 4, "seed": 3, "train_attn": False},
    {"rank": 1, "seed": 4, "train_unembed": False},
]
BAD, LEAVING = 2, 3
STEPS = 2
ADAM = types.AdamParams(learning_rate=1e-2)


def _data(tenant: int, step: int) -> tuple[list[types.Datum], str]:
    rng = np.random.default_rng(10 * tenant + step)
    data = []
    for n in (4 + tenant, 7 - step):
        ids = rng.integers(0, 250, size=n + 1).tolist()
        inputs = {"target_tokens": ids[1:], "weights": rng.random(n).round(3).tolist()}
        if tenant % 2:  # a policy-gradient loss next to cross entropy in the same fused pass
            inputs = {
                "target_tokens": ids[1:],
                "logprobs": [-5.0] * n,
                "advantages": rng.standard_normal(n).round(3).tolist(),
            }
        data.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs=inputs))
    return data, "importance_sampling" if tenant % 2 else "cross_entropy"


def _submit(client, tenant: int, step: int, bad: bool = False):
    data, loss = _data(tenant, step)
    if bad:
        data[1] = types.Datum(
            model_input=types.ModelInput.from_ints([3, 4, 10**6]),  # out of the vocabulary
            loss_fn_inputs={"target_tokens": [1, 2, 3], "weights": [1.0] * 3},
        )
    return client.forward_backward(data, loss), client.optim_step(ADAM)


def _outcome(future):
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - compared below
        return exc


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_dir):
    config = ServerConfig(port=0, data_dir=tmp_path_factory.mktemp("fused"), long_poll_s=5, torch_threads=1)
    thread = ServerThread(config)
    with thread:
        yield thread


def test_tenants_queued_together_get_their_own_results(server):
    import os

    os.environ["TINKER_TELEMETRY"] = "0"
    services = [
        tinker.ServiceClient(base_url=server.base_url, api_key=f"tml-t{t}") for t in range(len(SPECS))
    ]
    alone_service = tinker.ServiceClient(base_url=server.base_url, api_key="tml-alone")
    together = [
        s.create_lora_training_client(base_model=BASE, **spec).result()
        for s, spec in zip(services, SPECS, strict=True)
    ]
    alone = [alone_service.create_lora_training_client(base_model=BASE, **spec).result() for spec in SPECS]

    want = {}  # each model on its own: one op at a time, nothing else queued
    for tenant, client in enumerate(alone):
        for step in range(STEPS):
            fb, opt = _submit(client, tenant, step, bad=tenant == BAD and step == 0)
            want[tenant, step] = (_outcome(fb), _outcome(opt))

    trainer = server.app.state.tether.trainers.get(BASE)
    batches: list[int] = []
    fused = trainer.worker._execute_batch
    trainer.worker._execute_batch = lambda ops: (batches.append(len(ops)), fused(ops))[1]
    expected = sum(2 * STEPS for t in range(len(SPECS)))  # every forward_backward and optim_step
    futures = {}
    with trainer.executor.training._lock:  # the worker waits on the first op while the rest queue up
        for step in range(STEPS):
            for tenant, client in enumerate(together):
                futures[tenant, step] = _submit(client, tenant, step, bad=tenant == BAD and step == 0)
        while trainer.queued() < expected - 1:  # (one op may be taken and waiting for the lock)
            trainer.worker._cond.acquire()
            trainer.worker._cond.wait(0.05)
            trainer.worker._cond.release()
        services[LEAVING].close("success")  # its model is freed after its queued ops

    outcomes = {k: (_outcome(fb), _outcome(opt)) for k, (fb, opt) in futures.items() if k[0] != LEAVING}
    trainer.worker._execute_batch = fused
    assert batches and max(batches) == len(SPECS)  # every tenant's first forward_backward in one pass
    for (tenant, step), (got_fb, got_opt) in outcomes.items():
        want_fb = want[tenant, step][0]
        if tenant == BAD and step == 0:
            assert isinstance(got_fb, Exception) and isinstance(want_fb, Exception)
            assert "datum 1, field 'model_input'" in str(got_fb) and "outside the vocabulary" in str(got_fb)
            continue
        assert got_fb.metrics["loss:sum"] == pytest.approx(want_fb.metrics["loss:sum"], rel=1e-5, abs=1e-5)
        for g, w in zip(got_fb.loss_fn_outputs, want_fb.loss_fn_outputs, strict=True):
            np.testing.assert_allclose(g["logprobs"].data, w["logprobs"].data, rtol=1e-5, atol=1e-5)
        want_opt = want[tenant, step][1]
        assert got_opt.metrics == pytest.approx(want_opt.metrics, rel=1e-4, abs=1e-6)

    # the server still trains: a fresh tenant steps, and a survivor steps again
    fresh = alone_service.create_lora_training_client(base_model=BASE, rank=2, seed=1).result()
    assert _outcome(_submit(fresh, 0, 0)[0]).metrics["loss:sum"] == pytest.approx(
        want[0, 0][0].metrics["loss:sum"], rel=1e-5
    )
    assert np.isfinite(_outcome(_submit(together[0], 0, 0)[0]).metrics["loss:sum"])
    for tenant, service in enumerate(services):
        if tenant != LEAVING:
            service.close("success")
    alone_service.close("success")
