"""The weights a sampling request can name: the base model, LoRA adapters on it, full fine-tuned copies.

A LoRA adapter is installed on the shared base model's LoRA wrappers under a private adapter id
(`sampling/<n>`), so it can never collide with a trainer's adapter on the same base module, and the
same `weights_id` can be registered again (a newer snapshot) while requests on the old one finish.
Full fine-tuned weights get their own model built from the base config (on the meta device, so
nothing is allocated or randomly initialised before their tensors are put in). `unregister` only hides
the name; the adapter or model is dropped once the last request using it has finished.

This module knows nothing about batching or sampling.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tether.engine.lora import LoraSpec, LoraWeights, MultiLoraLinear, lora_layers, remove_adapter
from tether.types.errors import ConflictError, NotFoundError, ServerError, UserInputError

_LORA_SUFFIXES = (".lora_A", ".lora_B")
_ADAPTER_NUMBERS = itertools.count()
"""Process-wide, so two engines sharing one base model never pick the same adapter id."""


@dataclass(eq=False)
class RegisteredWeights:
    """One registration: which model to run and which adapter (if any) to route to."""

    weights_id: str | None
    model: nn.Module
    adapter_id: str | None = None
    users: int = 0
    """Requests admitted or waiting that use these weights."""
    retired: bool = False
    """Unregistered: no new requests; dropped when `users` reaches 0."""


class WeightsRegistry:
    """Thread-safe name -> weights map with deferred removal."""

    def __init__(self, base_model: nn.Module) -> None:
        self._base_model = base_model
        self._base = RegisteredWeights(None, base_model)
        self._by_id: dict[str, RegisteredWeights] = {}
        self._lock = threading.Lock()
        self.drops = 0
        """How many registrations were dropped so far (lets caches notice they hold stale weights)."""

    def register_lora(self, weights_id: str, spec: LoraSpec, tensors: dict[str, torch.Tensor]) -> None:
        """Install adapter tensors named `<module path>.lora_A/.lora_B` on the shared base model."""
        self._check_free(weights_id)
        layers = dict(lora_layers(self._base_model))
        if not layers:
            raise UserInputError("the base model has no LoRA layers attached", field="weights_id")
        factors = _group_factors(tensors, layers, spec)
        adapter_id = f"sampling/{next(_ADAPTER_NUMBERS)}"
        for name, (lora_A, lora_B) in factors.items():
            layers[name].adapters[adapter_id] = LoraWeights(lora_A, lora_B, spec.scale)
        self._publish(weights_id, RegisteredWeights(weights_id, self._base_model, adapter_id=adapter_id))

    def register_full(self, weights_id: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Build a model of the base architecture holding `state_dict` (HF parameter names)."""
        self._check_free(weights_id)
        model = _full_model(self._base_model, state_dict)
        self._publish(weights_id, RegisteredWeights(weights_id, model))

    def unregister(self, weights_id: str) -> None:
        """Hide `weights_id` from new requests; free it once its running requests finish."""
        with self._lock:
            entry = self._by_id.pop(weights_id, None)
            if entry is None:
                raise NotFoundError(f"no sampler weights registered as {weights_id!r}")
            entry.retired = True
            if entry.users == 0:
                self._drop(entry)

    def acquire(self, weights_id: str | None) -> RegisteredWeights:
        """The weights for a new request; keeps them alive until `release`."""
        with self._lock:
            entry = self._base if weights_id is None else self._by_id.get(weights_id)
            if entry is None:
                raise NotFoundError(f"no sampler weights registered as {weights_id!r}")
            entry.users += 1
            return entry

    def release(self, entry: RegisteredWeights) -> None:
        with self._lock:
            entry.users -= 1
            if entry.retired and entry.users == 0:
                self._drop(entry)

    def clear(self) -> None:
        """Drop every registration (engine shutdown): adapters leave the shared base model."""
        with self._lock:
            entries, self._by_id = list(self._by_id.values()), {}
            for entry in entries:
                entry.retired = True
                self._drop(entry)

    def is_registered(self, weights_id: str) -> bool:
        with self._lock:
            return weights_id in self._by_id

    def _check_free(self, weights_id: str) -> None:
        if not isinstance(weights_id, str) or not weights_id:
            raise UserInputError("must be a non-empty string", field="weights_id")
        if self.is_registered(weights_id):
            raise ConflictError(
                f"sampler weights {weights_id!r} are already registered; unregister them first"
            )

    def _publish(self, weights_id: str, entry: RegisteredWeights) -> None:
        with self._lock:
            if weights_id in self._by_id:
                self._drop(entry)
                raise ConflictError(
                    f"sampler weights {weights_id!r} are already registered; unregister them first"
                )
            self._by_id[weights_id] = entry

    def _drop(self, entry: RegisteredWeights) -> None:
        self.drops += 1
        if entry.adapter_id is not None:
            remove_adapter(self._base_model, entry.adapter_id)


def _group_factors(
    tensors: dict[str, torch.Tensor], layers: dict[str, MultiLoraLinear], spec: LoraSpec
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pair up and check A and B per layer; copy them to the layer's device and dtype."""
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        suffix = next((s for s in _LORA_SUFFIXES if name.endswith(s)), None)
        layer_name = name[: -len(suffix)] if suffix else None
        if suffix is None or layer_name not in layers:
            raise UserInputError(f"{name!r} is not a LoRA factor of a layer of this model", field="tensors")
        by_layer.setdefault(layer_name, {})[suffix[1:]] = tensor
    if not by_layer:
        raise UserInputError("no LoRA tensors given", field="tensors")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer_name, pair in by_layer.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise UserInputError(f"layer {layer_name!r} needs both lora_A and lora_B", field="tensors")
        layer = layers[layer_name]
        expected = {"lora_A": (spec.rank, layer.in_features), "lora_B": (layer.out_features, spec.rank)}
        for kind, tensor in pair.items():
            if tuple(tensor.shape) != expected[kind]:
                raise UserInputError(
                    f"{layer_name}.{kind} has shape {tuple(tensor.shape)}, expected {expected[kind]}",
                    field="tensors",
                )
            if not torch.isfinite(tensor).all():
                raise UserInputError(f"{layer_name}.{kind} has non-finite values", field="tensors")
        weight = layer.weight
        lora_A, lora_B = (
            pair[k].detach().to(device=weight.device, dtype=weight.dtype).clone()
            for k in ("lora_A", "lora_B")
        )
        factors[layer_name] = (lora_A, lora_B)
    return factors


def _full_model(base_model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A new model of the base's class and config with `state_dict` loaded; names may carry LoRA's `.base.`."""
    dtype = next(base_model.parameters()).dtype
    device = next(base_model.parameters()).device
    with torch.device("meta"):  # no memory, no random init: every weight comes from `state_dict`
        model = AutoModelForCausalLM.from_config(base_model.config, dtype=dtype)
    expected = model.state_dict()
    cleaned: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        plain = name.replace(".base.", ".")
        if plain not in expected:
            raise UserInputError(f"{name!r} is not a parameter of this model", field="state_dict")
        if tuple(tensor.shape) != tuple(expected[plain].shape):
            raise UserInputError(
                f"{name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[plain].shape)}",
                field="state_dict",
            )
        cleaned[plain] = tensor.detach().to(device=device, dtype=dtype, copy=True)  # the model's own
    tied = {"lm_head.weight"} if getattr(base_model.config, "tie_word_embeddings", False) else set()
    missing = set(expected) - set(cleaned) - tied
    if missing:
        raise UserInputError(f"missing parameters: {sorted(missing)[:5]}", field="state_dict")
    head = cleaned.get("lm_head.weight")
    embed = model.get_input_embeddings().weight
    embed_key = next(
        (
            n
            for n, p in model.named_parameters(remove_duplicate=False)
            if p is embed and n != "lm_head.weight"
        ),
        None,
    )
    untie = bool(
        tied and head is not None and embed_key in cleaned and not torch.equal(head, cleaned[embed_key])
    )
    if untie:  # a merged LoRA on lm_head: the output projection is no longer the input embedding
        assert head is not None  # `untie` requires it
        model.get_output_embeddings().weight = nn.Parameter(head, requires_grad=False)
    model.load_state_dict(cleaned, strict=False, assign=True)
    if tied and not untie:
        model.tie_weights()
    base_buffers = dict(base_model.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:  # not saved in a state dict (e.g. rotary frequencies): the base's own
            if name not in base_buffers:
                raise ServerError(f"buffer {name!r} of the sampling model has no value in the base model")
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            persistent = leaf not in module._non_persistent_buffers_set
            module.register_buffer(leaf, base_buffers[name].clone(), persistent=persistent)
    base_modules = dict(base_model.named_modules())
    for name, module in model.named_modules():  # plain tensor attributes (rotary's original_inv_freq)
        for attr, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(module, attr, getattr(base_modules[name], attr).clone())
    leftover = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if leftover:
        raise UserInputError(f"missing parameters: {leftover[:5]}", field="state_dict")
    model.eval()
    model.requires_grad_(False)
    return model
