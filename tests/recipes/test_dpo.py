"""DPO: pair loading and its errors, gradients against a plain-PyTorch DPO, and a run through the server.

The gradient test runs the recipe's loss function exactly as `forward_backward_custom` does (the
client half `compute_logprob_grads` on the engine's kept-graph logprobs, then the engine's
backward), and compares the accumulated gradients with DPO written out once more in plain PyTorch
on the unwrapped Hugging Face model (LoRA as forward hooks).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.engine.engine_reference import add_lora_hooks, plain_model, reference_logprobs
from tether.client.custom_loss import compute_logprob_grads
from tether.recipes import dpo
from tether.recipes.preference import PreferencePair, load_preference_pairs, pair_datums
from tether.types.errors import UserInputError


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- data


def test_both_pair_shapes_load_and_bad_lines_are_named_by_line_number(tmp_path):
    good = {"chosen": [_user("hi"), _assistant("hello")], "rejected": [_user("hi"), _assistant("go away")]}
    explicit = {"prompt": [_user("2+2")], "chosen": _assistant("4"), "rejected": [_assistant("5")]}
    pairs = load_preference_pairs(_write(tmp_path / "ok.jsonl", [good, "", explicit]))
    assert [(p.prompt, p.chosen["content"], p.rejected["content"], p.line) for p in pairs] == [
        ([_user("hi")], "hello", "go away", 1),
        ([_user("2+2")], "4", "5", 3),
    ]
    cases = {
        "not JSON": [good, "{oops"],
        "prompts differ": [
            good,
            good,
            {"chosen": [_user("a"), _assistant("x")], "rejected": [_user("b"), _assistant("y")]},
        ],
        "assistant message": [
            good,
            {"chosen": [_user("a"), _user("x")], "rejected": [_user("a"), _assistant("y")]},
        ],
        "needs 'chosen' and 'rejected'": [{"chosen": [_user("a"), _assistant("x")]}],
        "one assistant message": [good, {"prompt": [_user("a")], "chosen": [], "rejected": _assistant("y")}],
        "content": [
            good,
            {"chosen": [_user("a"), {"role": "assistant"}], "rejected": [_user("a"), _assistant("y")]},
        ],
    }
    for expected, rows in cases.items():
        with pytest.raises(UserInputError) as info:
            load_preference_pairs(_write(tmp_path / "bad.jsonl", rows))
        line = len(rows)
        assert info.value.field == "dataset_path" and info.value.datum_index == line - 1, expected
        assert f"line {line}:" in info.value.message and expected in info.value.message, info.value.message


def test_a_max_length_that_cuts_off_an_answer_is_refused(default_renderer):
    pair = PreferencePair(
        prompt=[_user("a long question " * 4)], chosen=_assistant("x"), rejected=_assistant("y"), line=7
    )
    chosen, rejected = pair_datums(default_renderer, pair, max_length=None)
    assert chosen.loss_fn_inputs["weights"].tolist()[-2:] == [1.0, 1.0]  # "x" then the end-of-turn token
    with pytest.raises(UserInputError) as info:
        pair_datums(default_renderer, pair, max_length=20)
    assert info.value.field == "max_length" and "line 7" in info.value.message


# ---- gradients vs plain PyTorch


@pytest.fixture(scope="module")
def default_base(default_model_dir):
    from tether.engine.default_model import DEFAULT_MODEL_NAME
    from tether.engine.model_loading import load_base_model

    return load_base_model(DEFAULT_MODEL_NAME)


@pytest.fixture(scope="module")
def default_renderer(default_model_dir):
    from transformers import AutoTokenizer

    from tether.renderers import renderer_for_model

    return renderer_for_model("tether/tiny-qwen3", AutoTokenizer.from_pretrained(default_model_dir))


PAIRS = [
    PreferencePair([_user("capital of France?")], _assistant("Paris"), _assistant("Rome")),
    PreferencePair([_user("1+1"), _assistant("2"), _user("and 2+2?")], _assistant("4"), _assistant("22")),
    PreferencePair(
        [{"role": "system", "content": "be brief"}, _user("hi")], _assistant("hi"), _assistant("hello there")
    ),
]


def _plain_dpo_loss(policy_sums, reference, beta):
    """-mean log sigmoid(beta * ((pc - rc) - (pr - rr))), written out independently of the recipe."""
    losses = []
    for i, (ref_chosen, ref_rejected) in enumerate(reference):
        logits = beta * ((policy_sums[2 * i] - ref_chosen) - (policy_sums[2 * i + 1] - ref_rejected))
        losses.append(torch.log1p(torch.exp(-logits)))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_dpo_gradients_equal_a_plain_pytorch_dpo(default_base, default_renderer, lora):
    from tether.engine.lora import LoraSpec
    from tether.engine.training_engine import TrainingEngine
    from tether.engine.training_types import EngineDatum

    spec = LoraSpec(rank=4, alpha=8.0, seed=3)
    engine = TrainingEngine(default_base)
    try:
        engine.create_model("m", lora=spec if lora else None)
        if lora:  # non-zero B, so every LoRA factor gets a gradient
            state = engine.export_state("m", include_optimizer=False)
            gen = torch.Generator().manual_seed(7)
            for name, tensor in state.weights.items():
                if name.endswith(".lora_B"):
                    tensor.copy_(0.05 * torch.randn(tensor.shape, generator=gen))
            engine.import_state("m", state, include_optimizer=False)
        datums = [d for pair in PAIRS for d in pair_datums(default_renderer, pair, max_length=None)]
        engine_data = [
            EngineDatum(
                torch.tensor(d.model_input.to_ints()),
                {k: torch.as_tensor(d.loss_fn_inputs[k].to_numpy()) for k in ("target_tokens", "weights")},
            )
            for d in datums
        ]
        reference = [(-9.0, -8.0), (-3.5, -6.0), (-12.0, -30.0)]  # margins of both signs, none saturated
        beta = 0.3

        handle, forward = engine.forward_keep_graph("m", engine_data)
        logprobs = [o["logprobs"].numpy() for o in forward.outputs]
        loss, metrics, grads = compute_logprob_grads(datums, logprobs, dpo.dpo_loss_fn(reference, beta))
        engine.backward_from_logprob_grads(handle, [torch.from_numpy(g) for g in grads])
        got = engine.accumulated_gradients("m")

        model = plain_model(default_base.path)
        if lora:
            leaves = add_lora_hooks(
                model, engine.export_state("m", include_optimizer=False).weights, spec.scale
            )
        else:
            leaves = dict(model.named_parameters())
        sums = [(reference_logprobs(model, d) * d.loss_fn_inputs["weights"]).sum() for d in engine_data]
        ref_loss = _plain_dpo_loss(sums, reference, beta)
        ref_loss.backward()
        expected = {n: t.grad for n, t in leaves.items() if t.grad is not None}

        assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-5)
        assert set(got) == set(expected) and len(got) > 0
        for name, grad in got.items():
            torch.testing.assert_close(
                grad, expected[name], atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
            )
        margins = [
            beta * ((float(sums[2 * i].detach()) - c) - (float(sums[2 * i + 1].detach()) - r))
            for i, (c, r) in enumerate(reference)
        ]
        assert metrics["accuracy"] == pytest.approx(np.mean([m > 0 for m in margins]))
        assert 0 < metrics["accuracy"] < 1, "the fixture has pairs on both sides"
        assert metrics["margin"] == pytest.approx(np.mean(margins), rel=1e-5)
        assert metrics["num_pairs"] == 3 and metrics["num_tokens"] == sum(
            float(d.loss_fn_inputs["weights"].sum()) for d in engine_data
        )

        # The comparison can fail: another beta gives other gradients.
        _, _, other = compute_logprob_grads(datums, logprobs, dpo.dpo_loss_fn(reference, beta * 1.01))
        assert max(float(np.abs(a - b).max()) for a, b in zip(other, grads, strict=True)) > 1e-4
    finally:
        for model_id in engine.list_models():
            engine.delete_model(model_id)


# ---- through the server


def test_dpo_raises_preference_accuracy_and_resumes_anchored_at_the_initial_weights(tmp_path, local_service):
    rows = [
        {
            "chosen": [_user(f"pick {i}"), _assistant("yes")],
            "rejected": [_user(f"pick {i}"), _assistant("no")],
        }
        for i in range(24)
    ]
    data = _write(tmp_path / "pairs.jsonl", rows)
    config = dpo.Config(
        dataset_path=data, test_size=8, log_dir=tmp_path / "run", lora_rank=8, learning_rate=1e-3, lr_schedule="constant",
        beta=0.5, batch_size=4, num_epochs=2, eval_every=3, save_every=2, progress=False,
    )  # fmt: skip
    train, held_out = dpo.split_pairs(config, load_preference_pairs(data))
    first = dpo.train_dpo(config.model_copy(update={"max_steps": 3}), local_service, train, held_out)
    assert first.steps_run == 3
    reference = json.loads((tmp_path / "run" / "reference.json").read_text())
    resumed = dpo.train_dpo(config, local_service, train, held_out)
    assert resumed.steps_run == 5  # 16 // 4 = 4 steps per epoch, 2 epochs; resumed at step 3
    assert (
        json.loads((tmp_path / "run" / "reference.json").read_text())
        == reference
        == {"sampler_path": resumed.reference_path}
    )
    cache = _read(tmp_path / "run" / "reference_logprobs.jsonl")
    assert len(cache) == len({r["key"] for r in cache}) == 24, "each pair's reference is computed once"

    metrics = _read(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(8))
    assert [r["next_step"] for r in _read(tmp_path / "run" / "checkpoints.jsonl")] == [2, 3, 4, 6, 8]
    evals = [r for r in metrics if "test/accuracy" in r]
    # At the start policy == reference: margins are zero up to float noise between the sampler's and the
    # trainer's logprobs (so accuracy, margin > 0, is a coin toss there), and the loss is log 2.
    assert abs(evals[0]["test/margin"]) < 1e-3 and evals[0]["test/dpo_loss"] == pytest.approx(
        np.log(2), abs=1e-3
    )
    assert evals[-1]["test/accuracy"] == 1.0 and evals[-1]["test/margin"] > 1.0
    assert metrics[-1]["dpo_loss"] < 0.5 * metrics[0]["dpo_loss"]
    assert metrics[-1]["chosen_reward"] > 0 > metrics[-1]["rejected_reward"]


def test_dpo_drives_the_official_tinker_sdk(tmp_path, local_service, monkeypatch):
    """The same loop with `tinker.ServiceClient`: its two-pass custom loss, sampler saves and compute_logprobs."""
    tinker = pytest.importorskip("tinker")
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    service = tinker.ServiceClient(base_url=local_service.base_url, api_key="tml-local")
    pairs = [PreferencePair([_user(f"pick {i}")], _assistant("yes"), _assistant("no")) for i in range(6)]
    config = dpo.Config(
        log_dir=tmp_path / "run", lora_rank=8, learning_rate=1e-3, lr_schedule="constant", beta=0.5, batch_size=2,
        eval_every=2, save_every=None, progress=False, sdk="tinker",
    )  # fmt: skip
    result = dpo.train_dpo(config, service, pairs[:4], pairs[4:])
    assert [r["step"] for r in result.metrics] == [0, 1]
    # at step 0 policy == reference: the margin is float noise (so accuracy is a coin toss there)
    assert abs(result.metrics[0]["test/margin"]) < 1e-3 and result.metrics[1]["accuracy"] == 1.0
    assert result.reference_path.startswith("tinker://") and result.final_state_path is not None
