"""Full fine-tuned weights get a model of their own, built without random initialisation."""

from __future__ import annotations

import pytest
import torch

from tether.engine.sampling.weights import _full_model
from tether.types.errors import UserInputError


@pytest.mark.parametrize("fixture", ["small_base", "small_llama_base"])
def test_the_built_model_is_the_state_dict_and_owns_its_tensors(fixture, request):
    base = request.getfixturevalue(fixture).model
    # the engine's base may carry LoRA wrappers (`.base.` in the names), the built model does not
    state = {k.replace(".base.", "."): v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()}
    if base.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model = _full_model(base, state)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    for name, tensor in model.state_dict().items():  # buffers (rotary frequencies) are the base's
        want = state.get(name, state.get(name.replace("lm_head", "model.embed_tokens")))
        if want is None:
            want = dict(base.named_buffers())[name]
        assert torch.equal(tensor, want), name
    reference = type(base)(base.config).eval()  # plain PyTorch: random init, then the state dict
    reference.load_state_dict(state, strict=False)
    tokens = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)
        before = model(tokens).logits
        for tensor in state.values():  # the caller's tensors may change later; the model must not
            tensor.zero_()
        assert torch.equal(model(tokens).logits, before)


def test_a_missing_parameter_is_refused(small_base):
    state = {k.replace(".base.", "."): v for k, v in small_base.model.state_dict().items()}
    state.pop(next(k for k in state if k.endswith("mlp.up_proj.weight")))
    with pytest.raises(UserInputError) as err:
        _full_model(small_base.model, state)
    assert err.value.field == "state_dict"
