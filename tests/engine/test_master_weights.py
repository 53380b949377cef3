"""fp32 master weights: a bf16 (or fp16) trainable tensor is stepped through an fp32 copy.

Reference: plain `torch.optim.AdamW` over fp32 copies fed the same gradients (in fp32), rounded to
bf16 after every step. The old path (AdamW straight on the bf16 tensors) is run beside it on the
same gradients to show what it froze. Saved states carry the masters, so a resumed run continues
bit-exactly; states saved before masters existed still load.
"""

from __future__ import annotations

import pytest
import torch
from engine_reference import make_data

from tether.engine.lora import LoraSpec
from tether.engine.model_loading import load_base_model
from tether.engine.optimizer import ModelOptimizer, NonFiniteStepError
from tether.engine.training_engine import AdamWParams, TrainingEngine, TrainingState

LR = 1e-5
ADAM = AdamWParams(learning_rate=LR, weight_decay=0.01, grad_clip_norm=1.0)
STEPS = 12


@pytest.fixture(scope="module")
def bf16_base(small_base):
    return load_base_model(str(small_base.path), dtype="bfloat16")


def _batch(engine: TrainingEngine, step: int):
    return make_data([7, 5, 6], vocab=engine.base.vocab_size, seed=100 + step)


def _reference_adamw(tensors: list[torch.Tensor]) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        tensors,
        lr=ADAM.learning_rate,
        betas=(ADAM.beta1, ADAM.beta2),
        eps=ADAM.eps,
        weight_decay=ADAM.weight_decay,
    )


def _train(engine: TrainingEngine, model_id: str, steps: range) -> None:
    for step in steps:
        engine.forward_backward(model_id, _batch(engine, step), "cross_entropy")
        engine.optim_step(model_id, ADAM)


def _state_tensors(engine: TrainingEngine, model_id: str) -> dict[str, torch.Tensor]:
    state = engine.export_state(model_id, include_optimizer=True)
    assert state.optimizer is not None
    return {**{f"w.{k}": v for k, v in state.weights.items()}, **state.optimizer}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _moved(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> float:
    changed = sum(int((after[n] != before[n]).sum()) for n in before)
    return changed / sum(t.numel() for t in before.values())


def test_bf16_full_fine_tune_equals_fp32_master_reference_and_moves_what_bf16_adamw_froze(bf16_base):
    engine = TrainingEngine(bf16_base)
    engine.create_model("m", lora=None)
    start = engine.export_state("m", include_optimizer=False).weights
    assert all(t.dtype == torch.bfloat16 for t in start.values())
    masters = {n: t.float() for n, t in start.items()}  # the reference: fp32 AdamW, rounded after each step
    reference = _reference_adamw(list(masters.values()))
    old = {n: t.clone() for n, t in start.items()}  # the old path: AdamW straight on the bf16 tensors
    old_adamw = _reference_adamw(list(old.values()))
    for step in range(STEPS):
        engine.forward_backward("m", _batch(engine, step), "cross_entropy")
        grads = engine.accumulated_gradients("m")
        assert all(g.dtype == torch.bfloat16 for g in grads.values())
        for name, grad in grads.items():
            masters[name].grad = grad.float()
            old[name].grad = grad.clone()
        torch.nn.utils.clip_grad_norm_(list(masters.values()), ADAM.grad_clip_norm)
        reference.step()
        reference.zero_grad()
        torch.nn.utils.clip_grad_norm_(list(old.values()), ADAM.grad_clip_norm)
        old_adamw.step()
        old_adamw.zero_grad()
        engine.optim_step("m", ADAM)
        weights = engine.export_state("m", include_optimizer=False).weights
        for name, master in masters.items():
            assert weights[name].dtype == torch.bfloat16
            assert torch.equal(weights[name], master.to(torch.bfloat16)), (step, name)
    saved = engine.export_state("m", include_optimizer=True).optimizer
    assert saved is not None
    for name, master in masters.items():
        assert torch.equal(saved[f"master.{name}"], master)
        for key in ("exp_avg", "exp_avg_sq"):
            assert saved[f"{key}.{name}"].dtype == torch.float32
            assert torch.equal(saved[f"{key}.{name}"], reference.state[master][key]), (key, name)
    # the weights really move at lr 1e-5, where AdamW on bf16 rounded most updates away
    moved, moved_old = _moved(weights, start), _moved(old, start)
    assert moved > 0.4 and moved_old < 0.2, (moved, moved_old)  # measured 0.42 and 0.15
    # sampler weights are the rounded masters, in the model's dtype
    sampler = engine.sampler_weights("m").tensors
    assert all(t.dtype == torch.bfloat16 for t in sampler.values())
    assert torch.equal(sampler["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])


def _save_and_read(state: TrainingState, tmp_path, fmt: str) -> TrainingState:
    """`state` written in `fmt` (the single-process safetensors store, or a DCP directory as many
    ranks write it) and read back as full tensors."""
    if fmt == "safetensors":
        from tether.storage.formats import StoredTrainingState
        from tether.storage.store import LocalCheckpointStore

        store = LocalCheckpointStore(tmp_path)
        path = "tinker://run-1/weights/ckpt"
        store.save_training_state(path, StoredTrainingState(state.weights, state.optimizer, state.metadata))
        stored = store.load_training_state(path, include_optimizer=True)
    else:
        import torch.distributed.checkpoint as dcp

        from tether.storage.formats import read_dcp_state

        flat = {f"weights/{k}": v for k, v in state.weights.items()}
        flat.update({f"optimizer/{k}": v for k, v in (state.optimizer or {}).items()})
        dcp.save(flat, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
        stored = read_dcp_state(tmp_path / "dcp", {"metadata": state.metadata}, include_optimizer=True)
    return TrainingState(stored.weights, stored.optimizer, stored.metadata)


@pytest.mark.filterwarnings("ignore:.*single process")
@pytest.mark.parametrize("fmt", ["safetensors", "dcp"])
def test_bf16_save_load_continue_equals_uninterrupted_run(bf16_base, tmp_path, fmt):
    engine = TrainingEngine(bf16_base)
    engine.create_model("run", lora=None)
    _train(engine, "run", range(3))
    state = engine.export_state("run", include_optimizer=True)
    assert state.optimizer is not None
    assert {k for k in state.optimizer if k.startswith("master.")} == {f"master.{n}" for n in state.weights}
    assert all(t.dtype == torch.bfloat16 for t in state.weights.values())
    assert all(t.dtype == torch.float32 for k, t in state.optimizer.items() if not k.startswith("step."))
    engine.import_state("resumed", _save_and_read(state, tmp_path, fmt), include_optimizer=True)
    _assert_equal(_state_tensors(engine, "resumed"), _state_tensors(engine, "run"))
    _train(engine, "run", range(3, 6))
    _train(engine, "resumed", range(3, 6))
    _assert_equal(_state_tensors(engine, "resumed"), _state_tensors(engine, "run"))
    # the saved masters are what makes it exact: restarted from the rounded weights, it drifts
    without = TrainingState(
        state.weights,
        {k: v for k, v in state.optimizer.items() if not k.startswith("master.")},
        state.metadata,
    )
    engine.import_state("from_weights", without, include_optimizer=True)
    _train(engine, "from_weights", range(3, 6))
    ours, exact = _state_tensors(engine, "from_weights"), _state_tensors(engine, "run")
    assert any(not torch.equal(ours[k], exact[k]) for k in exact if k.startswith("w."))


def test_state_saved_without_masters_loads_and_starts_them_from_the_weights(bf16_base):
    """The format before masters: bf16 moments (AdamW on the bf16 tensors), no `master.<name>`."""
    engine = TrainingEngine(bf16_base)
    engine.create_model("run", lora=None)
    _train(engine, "run", range(2))
    state = engine.export_state("run", include_optimizer=True)
    assert state.optimizer is not None
    old = {k: (v if k.startswith("step.") else v.to(torch.bfloat16)) for k, v in state.optimizer.items()}
    old = {k: v for k, v in old.items() if not k.startswith("master.")}
    engine.import_state("old", TrainingState(state.weights, old, state.metadata), include_optimizer=True)
    loaded = engine.export_state("old", include_optimizer=True).optimizer
    assert loaded is not None
    masters = {n: t.float() for n, t in state.weights.items()}
    reference = _reference_adamw(list(masters.values()))
    for name, master in masters.items():
        assert torch.equal(loaded[f"master.{name}"], master)  # the master starts from the loaded weights
        reference.state[master] = {key: old[f"{key}.{name}"].float() for key in ("exp_avg", "exp_avg_sq")}
        reference.state[master]["step"] = old[f"step.{name}"].clone()
        for key in ("exp_avg", "exp_avg_sq"):
            assert loaded[f"{key}.{name}"].dtype == torch.float32
            assert torch.equal(loaded[f"{key}.{name}"], old[f"{key}.{name}"].float())
    engine.forward_backward("old", _batch(engine, 2), "cross_entropy")
    for name, grad in engine.accumulated_gradients("old").items():
        masters[name].grad = grad.float()
    torch.nn.utils.clip_grad_norm_(list(masters.values()), ADAM.grad_clip_norm)
    reference.step()
    engine.optim_step("old", ADAM)
    weights = engine.export_state("old", include_optimizer=False).weights
    for name, master in masters.items():
        assert torch.equal(weights[name], master.to(torch.bfloat16)), name


def test_lora_adapters_on_a_bf16_base_are_fp32_and_need_no_masters(bf16_base):
    engine = TrainingEngine(bf16_base)
    engine.create_model("lora", lora=LoraSpec(rank=4, seed=3))
    _train(engine, "lora", range(2))
    state = engine.export_state("lora", include_optimizer=True)
    assert state.optimizer is not None and not any(k.startswith("master.") for k in state.optimizer)
    assert all(t.dtype == torch.float32 for t in state.weights.values())
    engine.delete_model("lora")


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fp32": torch.randn(5, 3, generator=g).requires_grad_(True),
        "bf16": (torch.randn(64, generator=g) * 0.02).to(torch.bfloat16).requires_grad_(True),
        "fp16": (torch.randn(9, generator=g) * 0.02).to(torch.float16).requires_grad_(True),
    }


@pytest.mark.parametrize("normalization", ["none", "num_sequences"])
def test_mixed_dtypes_fp32_in_place_and_others_through_masters(normalization):
    ours, theirs = _tensors(0), _tensors(0)
    opt = ModelOptimizer(ours)
    masters = {n: t.detach().float() if t.dtype != torch.float32 else t for n, t in theirs.items()}
    reference = _reference_adamw(list(masters.values()))
    for step in range(4):
        g = torch.Generator().manual_seed(10 + step)
        for name, t in ours.items():
            t.grad = torch.randn(t.shape, generator=g).to(t.dtype)
            masters[name].grad = t.grad.float() / (3.0 if normalization == "num_sequences" else 1.0)
        opt.accumulate(loss_tokens=7, sequences=3)
        opt.step(ADAM, normalization=normalization)
        torch.nn.utils.clip_grad_norm_(list(masters.values()), ADAM.grad_clip_norm)
        reference.step()
        reference.zero_grad()
        for name, t in ours.items():
            assert t.dtype == theirs[name].dtype and t.grad is None
            assert torch.equal(t.detach(), masters[name].detach().to(t.dtype)), (step, name)
    exported = opt.export_moments()
    assert "master.fp32" not in exported and {"master.bf16", "master.fp16"} <= exported.keys()
    assert exported["exp_avg.fp32"].dtype == torch.float32 and exported["exp_avg.bf16"].dtype == torch.float32


def test_nonfinite_check_reasons_on_the_master_and_the_model_dtype():
    """An fp16 weight whose master is near fp16's largest value: a step that would carry it past
    65520 is refused (the model's copy would be inf), though the weight alone looks far from it."""
    tensor = torch.ones(4, dtype=torch.float16).requires_grad_(True)
    opt = ModelOptimizer({"w": tensor})
    opt.import_moments(
        {
            "exp_avg.w": torch.zeros(4),
            "exp_avg_sq.w": torch.zeros(4),
            "step.w": torch.tensor(1.0),
            "master.w": torch.full((4,), 65515.0),
        },
        num_steps=1,
    )
    tensor.grad = -torch.ones(4, dtype=torch.float16)
    before = opt.export_moments()
    with pytest.raises(NonFiniteStepError):
        opt.step(AdamWParams(learning_rate=10.0))  # +7.3: 65522 is inf in fp16
    _assert_equal(opt.export_moments(), before)
    assert torch.equal(tensor.detach(), torch.ones(4, dtype=torch.float16)) and tensor.grad is not None
    opt.step(AdamWParams(learning_rate=1.0))  # +0.73 fits: the model's copy is the master rounded
    assert torch.equal(tensor.detach(), opt.export_moments()["master.w"].to(torch.float16))
    assert float(opt.export_moments()["master.w"][0]) > 65515.0 and float(tensor.detach()[0]) == 65504.0
