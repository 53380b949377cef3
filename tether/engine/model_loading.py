"""Load one base model (any Hugging Face causal LM) for training and sampling.

A requested name is resolved in a fixed order: the operator's alias map (so a client may ask for
`Qwen/Qwen3-8B` and get the checkpoint the operator provides), the embedded default model, a local
directory, and finally a hub id (downloaded or read from the HF cache where a network exists). The
name the client used is kept in `LoadedBaseModel.name` so every response can echo it.

The loaded model is frozen (base weights never get gradients; trainable tensors live in LoRA
adapters or in a full fine-tuning copy owned by the training engine), in eval mode (no dropout, so
the same inputs give the same logprobs), and already wrapped with LoRA layers so adapters can be
added at any time.

This module knows nothing about losses, optimizers or HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from tether.engine.default_model import DEFAULT_MODEL_NAME, ensure_default_model
from tether.engine.lora import attach_lora_layers
from tether.types.errors import ConfigurationError, NotFoundError, UserInputError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Weight dtypes an operator may ask for, by name."""


def resolve_device_and_dtype(device: str, dtype: str) -> tuple[str, str]:
    """Turn "auto" into a concrete choice: CUDA when there is one, bfloat16 weights on a GPU and
    float32 on a CPU (where bfloat16 matmuls are slow and training in it is lossy)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    return device, dtype


@dataclass
class LoadedBaseModel:
    """A frozen base model plus the facts about it that the engines and the server need."""

    name: str
    """The name the client used (kept in all responses), not the directory it resolved to."""
    path: Path
    """Local Hugging Face directory the weights were loaded from."""
    model: PreTrainedModel
    """Eval mode, base parameters `requires_grad=False`, LoRA wrappers attached."""
    tokenizer_path: Path
    """Directory holding the tokenizer files (usually equal to `path`)."""
    vocab_size: int
    """Rows of the output embedding: valid token ids are 0..vocab_size-1."""
    max_context_length: int
    """Longest sequence accepted: `max_position_embeddings` unless the operator set a lower limit."""
    eos_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a generation (from the generation config, else the model config)."""


def resolve_model_path(name: str, aliases: Mapping[str, str] | None = None) -> Path:
    """The local directory holding model `name`.

    Order: alias map (its value may itself be the default model's name or a hub id), the embedded
    default model, an existing local directory, a hub id via `huggingface_hub.snapshot_download`
    (which honours `HF_HUB_OFFLINE` and the HF cache). Raises `NotFoundError` when nothing matches.
    """
    aliases = aliases or {}
    target = aliases.get(name, name)
    if target == DEFAULT_MODEL_NAME:
        return ensure_default_model()
    local = Path(target).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise NotFoundError(f"model directory {str(local)!r} has no config.json")
        return local
    if name in aliases and (local.is_absolute() or target.startswith((".", "~"))):
        raise NotFoundError(f"alias {name!r} points to {target!r}, which is not a directory")
    return _download_from_hub(name, target)


def _download_from_hub(name: str, repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id))
    except Exception as exc:  # any hub failure means: this model is not available here
        raise NotFoundError(
            f"base model {name!r} not found locally or on the hub ({type(exc).__name__})"
        ) from exc


def load_base_model(
    name: str,
    *,
    aliases: Mapping[str, str] | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    max_context_length: int | None = None,
    weights: bool = True,
) -> LoadedBaseModel:
    """Resolve `name`, load it with `transformers`, freeze it and attach LoRA wrappers.

    With `weights=False` nothing is read but the config: the parameters are on the meta device
    (shapes and dtypes only, no memory) and the non-persistent buffers (rotary frequencies) are
    computed on `device`; a sharded engine fills its shards of copies of it itself
    (`tether.engine.fsdp`).

    `max_context_length` lets an operator cap the context below the model's
    `max_position_embeddings` (e.g. to bound memory); it can never raise it. `device` and `dtype`
    may be "auto" (see `resolve_device_and_dtype`).
    """
    device, dtype = resolve_device_and_dtype(device, dtype)
    if dtype not in DTYPES:
        raise ConfigurationError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}", field="dtype")
    path = resolve_model_path(name, aliases)
    try:
        model: PreTrainedModel = (
            AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
            if weights
            else _skeleton(path, DTYPES[dtype], device)
        )
    except (OSError, ValueError, KeyError) as exc:  # no weights, not a causal LM, unknown architecture
        raise UserInputError(f"cannot load {name!r} as a causal LM: {exc}", field="base_model") from exc
    if weights:
        model.to(device)  # type: ignore[arg-type]  # transformers wraps `to` with functools.wraps(nn.Module.to), which mistypes the bound call
    model.eval()
    model.requires_grad_(False)
    attach_lora_layers(model)
    config = model.config
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    model_max = int(getattr(config, "max_position_embeddings", 0) or 0) or None
    if max_context_length is not None and max_context_length < 1:
        raise ConfigurationError("must be a positive number of tokens", field="max_context_length")
    limits = [n for n in (model_max, max_context_length) if n is not None]
    if not limits:
        raise ConfigurationError(
            f"model {name!r} has no max_position_embeddings; set a limit", field="max_context_length"
        )
    return LoadedBaseModel(
        name=name,
        path=path,
        model=model,
        tokenizer_path=path,
        vocab_size=vocab_size,
        max_context_length=min(limits),
        eos_token_ids=_eos_token_ids(model),
    )


def _skeleton(path: Path, dtype: torch.dtype, device: str) -> PreTrainedModel:
    """The model of `path`'s config with meta parameters and real non-persistent buffers on `device`."""
    from transformers import AutoConfig, GenerationConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    for module in model.modules():
        if next(module.buffers(recurse=False), None) is not None:
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)  # transformers' own init computes the rotary frequencies
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def _eos_token_ids(model: PreTrainedModel) -> list[int]:
    generation_config = getattr(model, "generation_config", None)
    for source in (generation_config, model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is None:
            continue
        ids = [eos] if isinstance(eos, int) else list(eos)
        if ids:
            return [int(i) for i in ids]
    return []
