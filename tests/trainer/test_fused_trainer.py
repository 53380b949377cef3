"""Fused ops through the trainer: LoRA tenants' ops ready together run as one pass, with each
tenant's results as if run alone; full fine-tuning and custom-loss ops never fuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tether.trainer.config import EngineSettings
from tether.trainer.local import InProcessTrainer
from tether.types import ops
from tether.types.errors import UserInputError
from tether.types.wire import AdamParams, LoraConfig

BASE = "tether/tiny-qwen3"
LOSSES = ["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"]


def _trainer(path: Path, fuse: bool) -> InProcessTrainer:
    return InProcessTrainer(
        BASE,
        EngineSettings(data_dir=path, device="cpu", dtype="float32", torch_threads=1, fuse_lora_ops=fuse),
    )


def _data(tenant: int, step: int) -> list[ops.TrainingDatum]:
    rng = np.random.default_rng(100 * tenant + step)
    out = []
    for n in (5 + tenant, 3 + 2 * step):
        tokens = rng.integers(0, 250, size=n + 1)
        out.append(
            ops.TrainingDatum(
                input_tokens=tokens[:-1].astype(np.int64),
                loss_fn_inputs={
                    "target_tokens": tokens[1:].astype(np.int64),
                    "weights": rng.random(n).astype(np.float32),
                    "logprobs": np.full(n, -5.0, np.float32),
                    "advantages": rng.standard_normal(n).astype(np.float32),
                    "sampled_mask": (rng.random(n) > 0.3).astype(np.float32),
                },
            )
        )
    return out


def _fb(tenant: int, step: int, model: str | None = None) -> ops.ForwardBackward:
    loss = LOSSES[tenant % len(LOSSES)]
    data = _data(tenant, step)
    if loss == "cross_entropy":
        data = [
            ops.TrainingDatum(
                input_tokens=d.input_tokens,
                loss_fn_inputs={k: d.loss_fn_inputs[k] for k in ("target_tokens", "weights")},
            )
            for d in data
        ]
    else:
        data = [
            ops.TrainingDatum(
                input_tokens=d.input_tokens,
                loss_fn_inputs={
                    k: d.loss_fn_inputs[k]
                    for k in ("target_tokens", "logprobs", "advantages", "sampled_mask")
                },
            )
            for d in data
        ]
    return ops.ForwardBackward(model_id=model or f"t{tenant}", data=data, loss_fn=loss)


def _run(trainer: InProcessTrainer, tenants: int, steps: int, bad: int | None = None):
    """Every tenant's script queued behind a held engine, then released: returns results and batch sizes."""
    batches: list[int] = []
    if trainer.worker._execute_batch is not None:
        inner = trainer.worker._execute_batch
        trainer.worker._execute_batch = lambda b: (batches.append(len(b)), inner(b))[1]
    for t in range(tenants):
        trainer.submit(
            ops.CreateModel(
                model_id=f"t{t}",
                lora_config=LoraConfig(rank=1 + t % 4, seed=t, train_mlp=t % 2 == 0, train_attn=t % 3 != 1),
            ),
            stream=f"t{t}",
        ).result(60)
    trainer.submit(ops.CreateModel(model_id="full"), stream="full").result(60)
    futures: dict[str, list] = {}
    engine = trainer.executor.training
    with engine._lock:  # the worker waits on the first op while every other op queues up
        trainer.submit(ops.DeleteModel(model_id="gate"), stream="gate")
        for step in range(steps):
            for t in range(tenants):
                op = _fb(t, step)
                if bad == t and step == 0:
                    op.data[0].input_tokens[0] = 10**6  # out of vocabulary
                futures.setdefault(f"t{t}", []).append(
                    trainer.submit(op, stream=f"t{t}", seq_id=1 + 2 * step)
                )
                futures[f"t{t}"].append(
                    trainer.submit(
                        ops.OptimStep(model_id=f"t{t}", adam_params=AdamParams(learning_rate=1e-2)),
                        stream=f"t{t}",
                        seq_id=2 + 2 * step,
                    )
                )
            futures.setdefault("full", []).append(
                trainer.submit(_fb(0, step, "full"), stream="full", seq_id=1 + step)
            )
    results = {}
    for stream, fs in futures.items():
        results[stream] = []
        for f in fs:
            try:
                results[stream].append(f.result(120))
            except UserInputError as exc:
                results[stream].append(exc)
    return results, batches


def test_fused_trainer_equals_one_op_at_a_time(tmp_path):
    fused, plain = _trainer(tmp_path / "f", True), _trainer(tmp_path / "p", False)
    try:
        got, batches = _run(fused, tenants=6, steps=2, bad=2)
        want, _ = _run(plain, tenants=6, steps=2, bad=2)
    finally:
        fused.close()
        plain.close()
    assert batches and max(batches) >= 5  # the step's forward_backwards ran together
    assert isinstance(got["t2"][0], UserInputError) and isinstance(want["t2"][0], UserInputError)
    for stream in want:
        for g, w in zip(got[stream], want[stream], strict=True):
            if isinstance(w, Exception):
                assert type(g) is type(w)
            elif isinstance(w, ops.ForwardOutput):
                assert g.metrics["loss:sum"] == pytest.approx(w.metrics["loss:sum"], abs=1e-5, rel=1e-5)
                for gd, wd in zip(g.outputs, w.outputs, strict=True):
                    for key in wd:
                        np.testing.assert_allclose(gd[key], wd[key], atol=1e-5, rtol=1e-5)
            else:  # optimizer steps: the gradient norm shows each tenant's gradients matched
                assert g.metrics == pytest.approx(w.metrics, rel=1e-5)


def test_only_lora_forward_ops_are_fusible(tmp_path):
    trainer = _trainer(tmp_path, True)
    try:
        ex = trainer.executor
        assert ex.fusible(_fb(0, 0, "a")) is None  # no engine yet: nothing to fuse with
        trainer.submit(ops.CreateModel(model_id="a", lora_config=LoraConfig(rank=2)), stream="a").result(60)
        trainer.submit(ops.CreateModel(model_id="full"), stream="full").result(60)
        assert ex.fusible(_fb(0, 0, "a")) == "lora_forward"
        assert (
            ex.fusible(ops.Forward(model_id="a", data=_fb(0, 0).data, loss_fn="cross_entropy"))
            == "lora_forward"
        )
        assert ex.fusible(_fb(0, 0, "full")) is None
        assert ex.fusible(_fb(0, 0, "missing")) is None
        assert ex.fusible(ops.OptimStep(model_id="a", adam_params=AdamParams())) is None
        assert (
            ex.fusible(ops.ForwardKeepGraph(model_id="a", data=_fb(0, 0).data, graph_id="g", ttl_s=5)) is None
        )
    finally:
        trainer.close()


def _queued_together(trainer: InProcessTrainer, tenants: int) -> tuple[dict[str, int], dict[str, int]]:
    """One forward_backward per tenant queued while the worker is held, then released: the pass
    counts before and after."""
    for t in range(tenants):
        trainer.submit(
            ops.CreateModel(model_id=f"t{t}", lora_config=LoraConfig(rank=1 + t, seed=t)), stream=f"t{t}"
        ).result(60)
    before = trainer.pass_stats()
    engine = trainer.executor.training
    with engine._lock:
        # The worker is stuck on the lock (in housekeeping, or running this first-arrived op) until
        # every forward_backward has queued up behind it.
        trainer.submit(ops.DeleteModel(model_id="gate"), stream="gate")
        futures = [trainer.submit(_fb(t, 0), stream=f"t{t}", seq_id=1) for t in range(tenants)]
    for future in futures:
        future.result(120)
    return before, trainer.pass_stats()


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before if k != "max_ops_per_pass"} | {
        "max_ops_per_pass": after["max_ops_per_pass"]
    }


def test_pass_counts_show_one_fused_pass_carrying_every_tenant(tmp_path):
    trainer = _trainer(tmp_path, True)
    try:
        before, after = _queued_together(trainer, 4)
    finally:
        trainer.close()
    assert _delta(before, after) == {
        "passes": 1,
        "ops": 4,
        "fused_passes": 1,
        "fused_ops": 4,
        "max_ops_per_pass": 4,
    }


def test_pass_counts_of_one_tenant_are_unfused(tmp_path):
    trainer = _trainer(tmp_path, True)
    try:
        assert trainer.pass_stats()["passes"] == 0  # no engine yet: zeros, without building one
        trainer.submit(ops.CreateModel(model_id="t0", lora_config=LoraConfig(rank=2)), stream="t0").result(60)
        assert trainer.pass_stats()["passes"] == 0
        for seq in (1, 2, 3):
            trainer.submit(_fb(0, seq), stream="t0", seq_id=seq).result(60)
        stats = trainer.pass_stats()
    finally:
        trainer.close()
    assert stats == {"passes": 3, "ops": 3, "fused_passes": 0, "fused_ops": 0, "max_ops_per_pass": 1}


def test_pass_counts_without_fusing_show_one_pass_per_op(tmp_path):
    trainer = _trainer(tmp_path, False)  # fuse_lora_ops off (`tether serve --no-fuse-lora-ops`)
    try:
        before, after = _queued_together(trainer, 4)
    finally:
        trainer.close()
    assert _delta(before, after) == {
        "passes": 4,
        "ops": 4,
        "fused_passes": 0,
        "fused_ops": 0,
        "max_ops_per_pass": 1,
    }
