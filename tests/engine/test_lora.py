import pytest
import torch
from torch import nn

from tether.engine.lora import (
    AdapterRouting,
    LoraSpec,
    adapter_routing,
    add_adapter,
    attach_lora_layers,
    lora_layers,
)


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(8, 8)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 5, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, x):
        return self.lm_head(self.mlp.up_proj(self.self_attn.q_proj(x)))


def test_attach_classifies_layers_and_keeps_base_parameters():
    model = TinyBlock()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attach_lora_layers(model)
    kinds = {name: layer.kind for name, layer in lora_layers(model)}
    assert kinds == {"self_attn.q_proj": "attn", "mlp.up_proj": "mlp", "lm_head": "unembed"}
    add_adapter(model, "a", LoraSpec(rank=2, seed=0))
    assert len(list(model.parameters())) == 5  # adapters are not registered parameters
    assert {k.replace(".base", "") for k in model.state_dict()} == set(before)


def test_routing_applies_each_adapter_to_its_rows_only():
    torch.manual_seed(0)
    model = TinyBlock()
    attach_lora_layers(model)
    for adapter_id, seed in (("a", 1), ("b", 2)):
        for t in add_adapter(model, adapter_id, LoraSpec(rank=2, seed=seed)).values():
            with torch.no_grad():
                t.normal_(std=0.1)
    x = torch.randn(3, 4, 8)
    with adapter_routing(None):
        base = model(x)
    with adapter_routing("a"):
        only_a = model(x)
    with adapter_routing("b"):
        only_b = model(x)
    with adapter_routing(AdapterRouting.for_rows(["a", None, "b"], seq_len=4)):
        mixed = model(x)
    torch.testing.assert_close(mixed[0], only_a[0])
    torch.testing.assert_close(mixed[1], base[1])
    torch.testing.assert_close(mixed[2], only_b[2])
    assert not torch.allclose(only_a, base)
    # By batch row: the same, and it holds for a layer fed fewer positions (kept logits only).
    with adapter_routing(AdapterRouting.by_batch_row(["a", None, "b"])):
        by_row = model(x)
        last_only = model.lm_head(model.mlp.up_proj(model.self_attn.q_proj(x))[:, -1:])
    torch.testing.assert_close(by_row, mixed)
    torch.testing.assert_close(last_only, mixed[:, -1:])


def test_new_adapter_is_identity_and_flags_select_layers():
    model = TinyBlock()
    attach_lora_layers(model)
    x = torch.randn(2, 8)
    base = model(x)
    names = add_adapter(model, "a", LoraSpec(rank=4, seed=3, train_mlp=False))
    assert not any("mlp" in n for n in names)
    with adapter_routing("a"):
        torch.testing.assert_close(model(x), base)


def test_lora_rank_above_the_layer_sizes_or_bad_seed_is_refused_before_allocating():
    from tether.types.errors import UserInputError

    model = TinyBlock()
    with pytest.raises(UserInputError) as caught:
        add_adapter(model, "huge", LoraSpec(rank=10**9))
    assert caught.value.field == "rank" and "5" in caught.value.message  # lm_head: 8 -> 5
    assert not any("huge" in layer.adapters for _, layer in lora_layers(model))
    add_adapter(model, "max", LoraSpec(rank=5))
    with pytest.raises(UserInputError):
        add_adapter(model, "six", LoraSpec(rank=6))
    for seed in (-1, 2**64, 2**70):
        with pytest.raises(UserInputError) as caught:
            LoraSpec(rank=2, seed=seed)
        assert caught.value.field == "seed"
    LoraSpec(rank=2, seed=2**64 - 1)
