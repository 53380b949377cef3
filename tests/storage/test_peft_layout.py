"""A stored LoRA adapter means, read by PEFT's conventions alone, what tether's engine computes.

The reference merges the saved files into a plain Hugging Face model the way PEFT defines LoRA
(W + lora_alpha / r · B @ A, keys `base_model.model.<module>.lora_{A,B}.weight`), without any tether
code, and must match the engine's adapter forward pass.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tether.engine.lora import LoraSpec, adapter_routing, adapter_tensors, add_adapter, attach_lora_layers
from tether.storage import LocalCheckpointStore, LoraLayout, StoredHfWeights


def test_saved_adapter_merged_by_peft_rules_matches_engine(tmp_path, default_model_dir):
    engine_model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    attach_lora_layers(engine_model)
    spec = LoraSpec(rank=4, alpha=8.0, seed=0)
    params = add_adapter(engine_model, "a", spec)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in params.items():
            if name.endswith("lora_B"):
                tensor.copy_(0.05 * torch.randn(tensor.shape, generator=generator))

    store = LocalCheckpointStore(tmp_path)
    path = "tinker://s:train:0/sampler_weights/peft"
    store.save_hf_weights(
        path,
        StoredHfWeights(
            base_model=str(default_model_dir),
            tensors=adapter_tensors(engine_model, "a"),
            lora=LoraLayout(spec.rank, spec.alpha),
        ),
    )

    directory = store.directory(path)
    config = json.loads((directory / "adapter_config.json").read_text())
    adapter = load_file(str(directory / "adapter_model.safetensors"))
    reference = AutoModelForCausalLM.from_pretrained(
        config["base_model_name_or_path"], dtype=torch.float32
    ).eval()
    reference.lm_head.weight = torch.nn.Parameter(
        reference.lm_head.weight.detach().clone()
    )  # untie before merging
    scale = config["lora_alpha"] / config["r"]
    merged = 0
    with torch.no_grad():
        for key, lora_a in adapter.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module_path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            lora_b = adapter[key.replace(".lora_A.", ".lora_B.")]
            assert module_path.rpartition(".")[2] in config["target_modules"]
            reference.get_submodule(module_path).weight += scale * lora_b @ lora_a
            merged += 1
    assert merged == len(params) // 2

    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad(), adapter_routing("a"):
        engine_logits = engine_model(tokens).logits
    with torch.no_grad():
        reference_logits = reference(tokens).logits
        base_logits = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)(
            tokens
        ).logits
    assert not torch.allclose(engine_logits, base_logits, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(engine_logits, reference_logits, rtol=1e-4, atol=1e-4)
