"""Fused multi-LoRA forward/backward: every tenant's outputs, loss and gradients equal a separate run."""

from __future__ import annotations

import pytest
import torch
from engine_reference import make_data
from test_training_numerics import LOSS_CONFIGS

from tether.engine.lora import LoraSpec
from tether.engine.training_engine import LossRequest, TrainingEngine
from tether.engine.training_types import EngineDatum
from tether.types.errors import NotFoundError, UserInputError

TOL = {"atol": 1e-6, "rtol": 1e-6}
LOSSES = list(LOSS_CONFIGS)
FLAGS = [
    {"train_attn": True, "train_mlp": True, "train_unembed": True},
    {"train_attn": True, "train_mlp": False, "train_unembed": False},
    {"train_attn": False, "train_mlp": True, "train_unembed": True},
    {"train_attn": False, "train_mlp": False, "train_unembed": True},
]


def _spec(tenant: int) -> LoraSpec:
    return LoraSpec(rank=1 + 2 * (tenant % 4), alpha=4.0 + tenant, seed=tenant, **FLAGS[tenant % len(FLAGS)])


def _randomize(engine: TrainingEngine, model_id: str, seed: int) -> None:
    """Non-zero B (through import_state) so every factor gets a gradient and outputs differ per tenant."""
    state = engine.export_state(model_id, include_optimizer=False)
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in state.weights.items():
        if name.endswith(".lora_B"):
            tensor.copy_(0.05 * torch.randn(tensor.shape, generator=gen))
    engine.import_state(model_id, state, include_optimizer=False)


def _tenants(engine: TrainingEngine, count: int, prefix: str) -> list[str]:
    ids = []
    for tenant in range(count):
        model_id = f"{prefix}{tenant}"
        engine.create_model(model_id, lora=_spec(tenant))
        _randomize(engine, model_id, seed=100 + tenant)
        ids.append(model_id)
    return ids


def _request(model_id: str, tenant: int, vocab: int, *, backward: bool = True) -> LossRequest:
    lengths = [3 + (tenant * 5) % 11, 2 + (tenant * 3) % 7, 9][: 1 + tenant % 3]
    soft_k = 3 if tenant % 5 == 4 else None  # (N, K) targets next to 1-D ones in the same micro-batch
    loss_fn = "cross_entropy" if soft_k else LOSSES[tenant % len(LOSSES)]
    data = make_data(lengths, vocab=vocab, seed=tenant, soft_k=soft_k)
    return LossRequest(model_id, data, loss_fn, LOSS_CONFIGS.get(loss_fn), backward=backward)


def _assert_same(fused, separate, engine, fused_id, separate_id):
    assert fused.metrics.keys() == separate.metrics.keys()
    assert fused.metrics["loss:sum"] == pytest.approx(separate.metrics["loss:sum"], abs=1e-6, rel=1e-6)
    assert len(fused.outputs) == len(separate.outputs)
    for got, want in zip(fused.outputs, separate.outputs, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], **TOL)
    got_grads = engine.accumulated_gradients(fused_id)
    want_grads = engine.accumulated_gradients(separate_id)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        # a gradient sums over every token of the request, in an order that depends on the batch's
        # shape: hold each tensor to 1e-6 of its own scale (its largest element), elementwise
        scale = float(want_grads[name].abs().max())
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-6 * max(scale, 1.0), rtol=1e-6)


@pytest.mark.parametrize("budget", [8192, 24], ids=["one-micro-batch", "many-micro-batches"])
@pytest.mark.parametrize("count", [2, 5, 8])
def test_fused_equals_separate(training_engine, count, budget):
    engine = training_engine
    engine.max_tokens_per_micro_batch = budget
    vocab = engine.base.vocab_size
    separate_ids = _tenants(engine, count, "sep")
    fused_ids = _tenants(engine, count, "fus")
    separate = []
    for tenant, model_id in enumerate(separate_ids):
        request = _request(model_id, tenant, vocab)
        separate.append(
            engine.forward_backward(model_id, request.data, request.loss_fn, request.loss_fn_config)
        )
    fused = engine.forward_backward_fused([_request(m, t, vocab) for t, m in enumerate(fused_ids)])
    for tenant in range(count):
        assert not isinstance(fused[tenant], Exception)
        _assert_same(fused[tenant], separate[tenant], engine, fused_ids[tenant], separate_ids[tenant])


def test_forward_only_requests_fuse_without_gradients(training_engine):
    engine = training_engine
    vocab = engine.base.vocab_size
    separate_ids = _tenants(engine, 3, "sep")
    fused_ids = _tenants(engine, 3, "fus")
    backward = [True, False, True]
    separate = []
    for tenant, model_id in enumerate(separate_ids):
        r = _request(model_id, tenant, vocab)
        run = engine.forward_backward if backward[tenant] else engine.forward
        separate.append(run(model_id, r.data, r.loss_fn, r.loss_fn_config))
    fused = engine.forward_backward_fused(
        [_request(m, t, vocab, backward=backward[t]) for t, m in enumerate(fused_ids)]
    )
    for tenant in range(3):
        _assert_same(fused[tenant], separate[tenant], engine, fused_ids[tenant], separate_ids[tenant])
    assert engine.accumulated_gradients(fused_ids[1]) == {}


def test_a_bad_tenant_fails_alone(training_engine):
    engine = training_engine
    vocab = engine.base.vocab_size
    separate_ids = _tenants(engine, 4, "sep")
    fused_ids = _tenants(engine, 4, "fus")
    good = [0, 2]
    separate = {}
    for tenant in good:
        r = _request(separate_ids[tenant], tenant, vocab)
        separate[tenant] = engine.forward_backward(separate_ids[tenant], r.data, r.loss_fn, r.loss_fn_config)
    out_of_vocab = _request(fused_ids[1], 1, vocab)
    out_of_vocab.data[0].input_tokens[0] = vocab + 5
    missing_input = LossRequest(
        fused_ids[3], [EngineDatum(torch.arange(4), {"target_tokens": torch.arange(4)})], "ppo"
    )
    requests = [
        _request(fused_ids[0], 0, vocab),
        out_of_vocab,
        _request(fused_ids[2], 2, vocab),
        missing_input,
        LossRequest("nobody", make_data([4], vocab=vocab), "cross_entropy"),
        LossRequest(fused_ids[2], make_data([4], vocab=vocab), "no_such_loss"),
    ]
    results = engine.forward_backward_fused(requests)
    assert isinstance(results[1], UserInputError) and results[1].datum_index == 0
    assert isinstance(results[3], UserInputError)
    assert isinstance(results[4], NotFoundError)
    assert isinstance(results[5], UserInputError)
    for tenant in good:
        _assert_same(results[tenant], separate[tenant], engine, fused_ids[tenant], separate_ids[tenant])
    assert engine.accumulated_gradients(fused_ids[1]) == {}
    assert engine.accumulated_gradients(fused_ids[3]) == {}


def test_full_fine_tuning_runs_on_its_own_weights(training_engine):
    """A full fine-tuning model in a fused call is run by itself and equals a separate call."""
    engine = training_engine
    vocab = engine.base.vocab_size
    engine.create_model("full-sep", lora=None)
    engine.create_model("full-fus", lora=None)
    lora_sep = _tenants(engine, 2, "sep")
    lora_fus = _tenants(engine, 2, "fus")
    want = {
        m: engine.forward_backward(m, r.data, r.loss_fn, r.loss_fn_config)
        for m, r in [
            (lora_sep[0], _request(lora_sep[0], 0, vocab)),
            ("full-sep", _request("full-sep", 1, vocab)),
            (lora_sep[1], _request(lora_sep[1], 2, vocab)),
        ]
    }
    got = engine.forward_backward_fused(
        [_request(lora_fus[0], 0, vocab), _request("full-fus", 1, vocab), _request(lora_fus[1], 2, vocab)]
    )
    _assert_same(got[0], want[lora_sep[0]], engine, lora_fus[0], lora_sep[0])
    _assert_same(got[1], want["full-sep"], engine, "full-fus", "full-sep")
    _assert_same(got[2], want[lora_sep[1]], engine, lora_fus[1], lora_sep[1])
    assert (
        engine.is_lora("full-fus") is False
        and engine.is_lora(lora_fus[0]) is True
        and engine.is_lora("x") is None
    )


def test_loss_sums_stay_on_the_device_until_the_result(training_engine, monkeypatch):
    """One host read and one transfer per request, however many micro-batches and tenants it has."""
    import tether.engine.training_engine as module

    engine = training_engine
    engine.max_tokens_per_micro_batch = 16  # several micro-batches per request
    ids = _tenants(engine, 3, "t")
    reads = {"float": 0, "item": 0, "transfers": 0}
    real_float, real_item, real_to_host = torch.Tensor.__float__, torch.Tensor.item, module._to_host

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            reads[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch.Tensor, "__float__", counted("float", real_float))
    monkeypatch.setattr(torch.Tensor, "item", counted("item", real_item))
    monkeypatch.setattr(module, "_to_host", counted("transfers", real_to_host))
    data = make_data([7, 5, 9, 3, 6, 8], vocab=engine.base.vocab_size)
    engine.forward_backward(ids[0], data, "ppo")
    assert reads == {"float": 1, "item": 0, "transfers": 1}
    reads.update(float=0, transfers=0)
    engine.forward_backward_fused([LossRequest(m, data, "cross_entropy") for m in ids])
    assert reads == {"float": 3, "item": 0, "transfers": 1}  # one loss:sum per tenant, read from one transfer
