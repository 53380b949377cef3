"""Sampled-token and prompt logprobs equal a plain forward pass of the same tokens (fp32, 1e-4).

References are plain Hugging Face models without LoRA wrappers: LoRA is merged into the weights
(W + scale * B @ A), full fine-tuned weights are loaded as they are. A second check compares with
the training engine's `forward`, the number RL losses are computed against.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tether.engine.lora import LoraSpec, lora_layers
from tether.engine.sampling import SampleRequest
from tether.engine.training_engine import TrainingEngine
from tether.engine.training_types import AdamWParams, EngineDatum

PROMPT = list(b"Logprobs must match")
TOLERANCE = 1e-4


def plain_model(base, overrides: dict[str, torch.Tensor] | None = None) -> nn.Module:
    model = AutoModelForCausalLM.from_config(base.model.config)
    state = {k.replace(".base.", "."): v for k, v in base.model.state_dict().items()}
    state.update(overrides or {})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model.eval()


def reference_logprobs(model: nn.Module, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    return logprobs.gather(1, ids[0, 1:, None]).squeeze(1)[len(prompt) - 1 :]


def random_lora(base, spec: LoraSpec, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in lora_layers(base.model):
        tensors[f"{name}.lora_A"] = torch.randn(spec.rank, layer.in_features, generator=generator) * 0.2
        tensors[f"{name}.lora_B"] = torch.randn(layer.out_features, spec.rank, generator=generator) * 0.2
    return tensors


def merged(base, spec: LoraSpec, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layers = dict(lora_layers(base.model))
    return {
        f"{name}.weight": layers[name].weight.detach()
        + spec.scale * tensors[f"{name}.lora_B"] @ tensors[f"{name}.lora_A"]
        for name in layers
    }


def sample(engine, weights_id: str | None, num_samples: int = 2, prompt: list[int] = PROMPT):
    return engine.submit(
        SampleRequest(
            prompt,
            num_samples=num_samples,
            max_tokens=24,
            temperature=1.0,
            seed=11,
            stop=[],
            weights_id=weights_id,
        )
    )


def test_sampled_logprobs_match_plain_forward_for_base_lora_and_full_weights_in_one_batch(engine, base):
    spec = LoraSpec(rank=4, alpha=8)
    lora = random_lora(base, spec, seed=1)
    engine.register_lora("lora", spec, lora)
    full_state = {
        k.replace(".base.", "."): v + 0.05 * torch.randn_like(v) for k, v in base.model.state_dict().items()
    }
    engine.register_full("full", full_state)
    references = {
        None: plain_model(base),
        "lora": plain_model(base, merged(base, spec, lora)),
        "full": plain_model(base, full_state),
    }
    # One running batch with prompts of different lengths, so rows are padded differently.
    prompts = {None: PROMPT, "lora": PROMPT[:5], "full": PROMPT + list(b" and then some")}
    futures = {
        weights_id: sample(engine, weights_id, prompt=prompts[weights_id]) for weights_id in references
    }
    for weights_id, future in futures.items():
        for sequence in future.result(timeout=60).sequences:
            expected = reference_logprobs(references[weights_id], prompts[weights_id], sequence.tokens)
            got = torch.tensor(sequence.logprobs)
            assert torch.allclose(got, expected, atol=TOLERANCE), (weights_id, (got - expected).abs().max())


def test_prompt_logprobs_and_topk_match_plain_forward(engine, base):
    spec = LoraSpec(rank=2, alpha=4)
    lora = random_lora(base, spec, seed=2)
    engine.register_lora("lora", spec, lora)
    reference = plain_model(base, merged(base, spec, lora))
    result = engine.submit(
        SampleRequest(
            PROMPT, max_tokens=1, include_prompt_logprobs=True, topk_prompt_logprobs=3, weights_id="lora"
        )
    ).result(timeout=60)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(input_ids=ids).logits[0, :-1].float(), dim=-1)
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(PROMPT)
    expected = logprobs.gather(1, ids[0, 1:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(result.prompt_logprobs[1:]), expected, atol=TOLERANCE)
    assert result.topk_prompt_logprobs[0] is None
    values, token_ids = logprobs.topk(3, dim=-1)
    for position, row in enumerate(result.topk_prompt_logprobs[1:]):
        assert [t for t, _ in row] == token_ids[position].tolist()
        assert torch.allclose(torch.tensor([v for _, v in row]), values[position], atol=TOLERANCE)


def test_single_token_prompt_has_only_the_empty_first_position(engine):
    result = engine.submit(SampleRequest([5], max_tokens=1, include_prompt_logprobs=True)).result(timeout=60)
    assert result.prompt_logprobs == [None]


def test_default_model_base_logprobs_match(default_model_dir):
    from tether.engine.model_loading import load_base_model
    from tether.engine.sampling import SamplingEngine

    base = load_base_model(str(default_model_dir))
    engine = SamplingEngine(base)
    try:
        sequence = sample(engine, None, num_samples=1).result(timeout=60).sequences[0]
    finally:
        engine.close()
    expected = reference_logprobs(plain_model(base), PROMPT, sequence.tokens)
    assert torch.allclose(torch.tensor(sequence.logprobs), expected, atol=TOLERANCE)


@pytest.mark.parametrize("lora", [LoraSpec(rank=4, alpha=16, seed=3), None], ids=["lora", "full"])
def test_sampled_logprobs_match_the_training_engines_forward(engine, base, lora):
    trainer = TrainingEngine(base)
    trainer.create_model("policy", lora=lora)
    datum = EngineDatum(
        input_tokens=torch.tensor(PROMPT[:-1]),
        loss_fn_inputs={"target_tokens": torch.tensor(PROMPT[1:]), "weights": torch.ones(len(PROMPT) - 1)},
    )
    trainer.forward_backward("policy", [datum], "cross_entropy")
    trainer.optim_step("policy", AdamWParams(learning_rate=5e-2))  # moves B (LoRA) or every weight (full)
    weights = trainer.sampler_weights("policy")
    if weights.is_lora:
        engine.register_lora("snapshot", weights.lora_spec, weights.tensors)
    else:
        engine.register_full("snapshot", weights.tensors)
    sequence = sample(engine, "snapshot", num_samples=1).result(timeout=60).sequences[0]
    tokens = PROMPT + sequence.tokens
    check = EngineDatum(
        input_tokens=torch.tensor(tokens[:-1]),
        loss_fn_inputs={"target_tokens": torch.tensor(tokens[1:]), "weights": torch.ones(len(tokens) - 1)},
    )
    trained = trainer.forward("policy", [check], "cross_entropy").outputs[0]["logprobs"][len(PROMPT) - 1 :]
    base_only = reference_logprobs(plain_model(base), PROMPT, sequence.tokens)
    assert not torch.allclose(trained, base_only, atol=1e-3), (
        "the training step should have changed the model"
    )
    assert torch.allclose(torch.tensor(sequence.logprobs), trained.float(), atol=TOLERANCE)
    trainer.delete_model("policy")


def test_topk_sample_logprobs_match_plain_forward_and_only_when_asked(engine, base):
    wanted = engine.submit(
        SampleRequest(PROMPT, max_tokens=6, temperature=1.0, seed=4, stop=[], topk_sample_logprobs=3)
    )
    plain = engine.submit(SampleRequest(PROMPT, max_tokens=6, temperature=1.0, seed=4, stop=[]))
    sequence = wanted.result(timeout=60).sequences[0]
    assert plain.result(timeout=60).sequences[0].topk_logprobs is None
    ids = torch.tensor([PROMPT + sequence.tokens])
    with torch.no_grad():
        logprobs = torch.log_softmax(plain_model(base)(input_ids=ids).logits[0, :-1].float(), dim=-1)
    values, token_ids = logprobs[len(PROMPT) - 1 :].topk(3, dim=-1)
    assert len(sequence.topk_logprobs) == len(sequence.tokens)
    for position, row in enumerate(sequence.topk_logprobs):
        assert [t for t, _ in row] == token_ids[position].tolist()
        assert torch.allclose(torch.tensor([v for _, v in row]), values[position], atol=TOLERANCE)
