"""On-disk checkpoint formats: files inside one checkpoint directory. No atomicity, no naming —
`tether.storage.store` stages the directory and commits it — and no engine imports: a checkpoint
goes in and comes out as tensors plus JSON-able metadata.

Two formats:

* training state (`weights/<name>`): `weights.safetensors`, optionally `optimizer.safetensors`,
  metadata in the manifest. Tensor names are the engine's own; tether reads them back exactly.
  A multi-rank trainer writes it instead as a `torch.distributed.checkpoint` (DCP) directory `dcp/`
  (each rank its shards; keys `weights/<name>`, `optimizer/<moment>.<name>`), which reads back
  here as full tensors on any number of ranks.
* Hugging Face weights (`sampler_weights/<name>`, `external_weights/<name>`), loadable by the
  ecosystem without tether: a LoRA adapter in PEFT layout (`adapter_model.safetensors` with keys
  `base_model.model.<module path>.lora_A.weight`, plus `adapter_config.json`), or a full model as
  `model.safetensors` with the base's `config.json` copied beside it so `from_pretrained` loads
  it. Tokenizer files are copied too when the caller gives a tokenizer directory.

Tensors that are the same tensor (tied embeddings) are stored once and restored as one object;
in the HF format the tied copy is simply absent, as `save_pretrained` does it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tether.storage.manifest import verify_files
from tether.types.errors import UserInputError

__all__ = [
    "TRAINING_STATE_KIND",
    "HF_WEIGHTS_KIND",
    "StoredTrainingState",
    "LoraLayout",
    "StoredHfWeights",
    "write_training_state",
    "read_training_state",
    "read_dcp_state",
    "verify_training_state",
    "training_state_reader",
    "DCP_DIR",
    "write_hf_weights",
    "read_hf_weights",
    "peft_key",
    "engine_key_from_peft",
]

TRAINING_STATE_KIND = "training_state"
HF_WEIGHTS_KIND = "hf_weights"

DCP_DIR = "dcp"
"""Training state written by many ranks with torch.distributed.checkpoint (layout `{"dcp": DCP_DIR}`)."""
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
MODEL_FILE = "model.safetensors"
_BASE_CONFIG_FILES = ("config.json", "generation_config.json")
_TOKENIZER_FILES = (
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
_PEFT_PREFIX = "base_model.model."


@dataclass
class StoredTrainingState:
    """Weights, optional optimizer tensors and the caller's metadata (JSON-able)."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoraLayout:
    """What PEFT needs to know about an adapter: rank, alpha (scale = alpha / rank), target leaves."""

    rank: int
    alpha: float
    target_modules: list[str] | None = None
    """Leaf module names (`q_proj`, `lm_head`); derived from the tensor names when None."""


@dataclass
class StoredHfWeights:
    """Weights in Hugging Face layout: a LoRA adapter (`lora` set) or a full state dict.

    LoRA tensor names are the engine's `<module path>.lora_A` / `.lora_B` (A: rank × in,
    B: out × rank); the PEFT key mapping happens in this module only.
    """

    base_model: str
    tensors: dict[str, torch.Tensor]
    lora: LoraLayout | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def is_lora(self) -> bool:
        return self.lora is not None


# ------------------------------------------------------------------ tensor files


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Unique tensors to save, and alias name → saved name for tensors that are the same view.

    safetensors refuses tensors sharing memory; identical views are stored once, other overlaps
    are cloned.
    """
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen_views: dict[tuple, str] = {}
    seen_storage: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else 0
        view = (ptr, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if ptr and view in seen_views:
            aliases[name] = seen_views[view]
            continue
        if ptr and (ptr in seen_storage or not tensor.is_contiguous()):
            tensor = tensor.clone().contiguous()
        if ptr:
            seen_views[view] = name
            seen_storage.add(ptr)
        unique[name] = tensor.contiguous()
    return unique, aliases


def _save(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, str]:
    unique, aliases = _dedupe(tensors)
    save_file(unique, str(path), metadata={"format": "pt"})
    return aliases


def _load(path: Path, aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    tensors = load_file(str(path))
    for alias, original in aliases.items():
        tensors[alias] = tensors[original]
    return tensors


# ------------------------------------------------------------------ training state


def write_training_state(directory: Path, state: StoredTrainingState) -> dict[str, Any]:
    """Write the state's files into `directory`; returns the manifest `layout` to record."""
    layout: dict[str, Any] = {"weight_aliases": _save(state.weights, directory / WEIGHTS_FILE)}
    layout["has_optimizer"] = state.optimizer is not None
    if state.optimizer is not None:
        layout["optimizer_aliases"] = _save(state.optimizer, directory / OPTIMIZER_FILE)
    return layout


def read_training_state(
    directory: Path, manifest: dict[str, Any], *, include_optimizer: bool
) -> StoredTrainingState:
    """Verify and read a training state; with `include_optimizer` the optimizer file must exist."""
    layout = manifest.get("layout", {})
    verify_training_state(directory, manifest, include_optimizer=include_optimizer)
    if layout.get("dcp"):
        return read_dcp_state(directory / layout["dcp"], manifest, include_optimizer=include_optimizer)
    weights = _load(directory / WEIGHTS_FILE, layout.get("weight_aliases", {}))
    optimizer = (
        _load(directory / OPTIMIZER_FILE, layout.get("optimizer_aliases", {})) if include_optimizer else None
    )
    return StoredTrainingState(weights=weights, optimizer=optimizer, metadata=manifest.get("metadata", {}))


def verify_training_state(
    directory: Path, manifest: dict[str, Any], *, include_optimizer: bool, hashes: bool = True
) -> None:
    """Check the files a read of the training state needs (sizes and, with `hashes`, sha256:
    CorruptCheckpointError); UserInputError when `include_optimizer` asks for moments it was saved without."""
    layout = manifest.get("layout", {})
    if include_optimizer and not layout.get("has_optimizer"):
        raise UserInputError("this checkpoint was saved without optimizer state", field="optimizer")
    if layout.get("dcp"):
        names = sorted(manifest.get("files", {}))
    else:
        names = [WEIGHTS_FILE] + ([OPTIMIZER_FILE] if include_optimizer else [])
    verify_files(directory, manifest, names, hashes=hashes)


def training_state_reader(directory: Path, manifest: dict[str, Any]) -> tuple[Any, dict[str, TensorInfo]]:
    """A `torch.distributed.checkpoint` storage reader over a (verified) training state, and what it holds.

    The second value maps each `weights/<name>` and `optimizer/<moment>.<name>` to its stored key,
    shape and dtype. Loading a state dict of sharded tensors (DTensors) under those stored keys with
    `torch.distributed.checkpoint.load(..., storage_reader=reader)` reads on each rank only the
    slices its shards cover, whether the state was written by many ranks (DCP) or by one process
    (safetensors, read with DCP's Hugging Face reader, tied aliases resolved).
    """
    from torch.distributed.checkpoint import FileSystemReader, HuggingFaceStorageReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    layout = manifest.get("layout", {})
    if layout.get("dcp"):
        reader: Any = FileSystemReader(str(directory / layout["dcp"]))
        stored = {key: key for key in reader.read_metadata().state_dict_metadata}
    else:
        reader = HuggingFaceStorageReader(str(directory))
        stored = {}
        for prefix, file, aliases in (
            ("weights/", WEIGHTS_FILE, layout.get("weight_aliases", {})),
            ("optimizer/", OPTIMIZER_FILE, layout.get("optimizer_aliases", {})),
        ):
            if not (directory / file).exists():
                continue
            with safe_open(str(directory / file), framework="pt") as f:
                stored.update({prefix + key: key for key in f.keys()})  # noqa: SIM118 - safe_open has no __iter__
            stored.update({prefix + alias: original for alias, original in aliases.items()})
    items = reader.read_metadata().state_dict_metadata
    out = {}
    for key, original in stored.items():
        item = items.get(original)
        if isinstance(item, TensorStorageMetadata):
            out[key] = TensorInfo(original, tuple(item.size), item.properties.dtype)
    return reader, out


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor of a training state: its key in the files, its shape and dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def read_dcp_state(
    directory: Path, manifest: dict[str, Any], *, include_optimizer: bool
) -> StoredTrainingState:
    """Full tensors of a DCP training state, however many ranks wrote it (read here alone, no collective)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(directory))
    wanted = ("weights/", "optimizer/") if include_optimizer else ("weights/",)
    state = {
        key: torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in reader.read_metadata().state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata) and key.startswith(wanted)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process.*")
        load(state, storage_reader=reader, no_dist=True)
    weights = {k.removeprefix("weights/"): v for k, v in state.items() if k.startswith("weights/")}
    optimizer = {k.removeprefix("optimizer/"): v for k, v in state.items() if k.startswith("optimizer/")}
    return StoredTrainingState(
        weights=weights,
        optimizer=optimizer if include_optimizer else None,
        metadata=manifest.get("metadata", {}),
    )


# ------------------------------------------------------------------ Hugging Face weights


def peft_key(engine_name: str) -> str:
    """`<module>.lora_A` → `base_model.model.<module>.lora_A.weight` (PEFT's saved key)."""
    module, _, which = engine_name.rpartition(".")
    if which not in ("lora_A", "lora_B") or not module:
        raise ValueError(f"LoRA tensor name must end in .lora_A or .lora_B, got {engine_name!r}")
    return f"{_PEFT_PREFIX}{module}.{which}.weight"


def engine_key_from_peft(key: str) -> str:
    """Inverse of `peft_key`; also accepts PEFT's adapter-named form `...lora_A.default.weight`."""
    if not key.startswith(_PEFT_PREFIX) or not key.endswith(".weight"):
        raise ValueError(f"not a PEFT LoRA key: {key!r}")
    inner = (
        key[len(_PEFT_PREFIX) : -len(".weight")]
        .replace(".lora_A.default", ".lora_A")
        .replace(".lora_B.default", ".lora_B")
    )
    peft_key(inner)  # validates the suffix
    return inner


def _copy_named(
    source_dir: Path | None, names: tuple[str, ...], target: Path, *, prefix: str = ""
) -> list[str]:
    if source_dir is None:
        return []
    copied = []
    for path in sorted(Path(source_dir).iterdir()):
        if path.is_file() and (path.name in names or (prefix and path.name.startswith(prefix))):
            shutil.copyfile(path, target / path.name)
            copied.append(path.name)
    return copied


def write_hf_weights(
    directory: Path,
    weights: StoredHfWeights,
    *,
    base_model_dir: Path | None = None,
    tokenizer_dir: Path | None = None,
) -> dict[str, Any]:
    """Write PEFT adapter files or a full HF model; returns the manifest `layout`.

    A full model needs `base_model_dir` (its config.json is copied); tokenizer files are copied
    from `tokenizer_dir` when given.
    """
    layout: dict[str, Any] = {"base_model": weights.base_model, "is_lora": weights.is_lora}
    if weights.lora is not None:
        lora = weights.lora
        targets = lora.target_modules or sorted(
            {name.rpartition(".")[0].rpartition(".")[2] for name in weights.tensors}
        )
        adapter = {peft_key(name): tensor for name, tensor in weights.tensors.items()}
        layout["aliases"] = _save(adapter, directory / ADAPTER_FILE)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": lora.rank,
            "lora_alpha": lora.alpha,
            "target_modules": targets,
            "base_model_name_or_path": weights.base_model,
            "bias": "none",
            "lora_dropout": 0.0,
            "fan_in_fan_out": False,
            "inference_mode": True,
            "use_rslora": False,
            "modules_to_save": None,
        }
        (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2))
        layout["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "target_modules": targets}
    else:
        if base_model_dir is None or not (Path(base_model_dir) / "config.json").is_file():
            raise ValueError("full-model weights need base_model_dir with a config.json")
        layout["aliases"] = _save(weights.tensors, directory / MODEL_FILE)
        _copy_named(base_model_dir, _BASE_CONFIG_FILES, directory)
    layout["tokenizer_files"] = _copy_named(tokenizer_dir, _TOKENIZER_FILES, directory, prefix="tokenizer")
    return layout


def read_hf_weights(directory: Path, manifest: dict[str, Any]) -> StoredHfWeights:
    """Verify and read HF weights written by `write_hf_weights` (engine tensor names for LoRA)."""
    layout = manifest.get("layout", {})
    aliases = layout.get("aliases", {})
    if layout.get("is_lora"):
        verify_files(directory, manifest, [ADAPTER_FILE, ADAPTER_CONFIG_FILE])
        raw = _load(directory / ADAPTER_FILE, aliases)
        tensors = {engine_key_from_peft(key): tensor for key, tensor in raw.items()}
        spec = layout["lora"]
        lora = LoraLayout(
            rank=int(spec["rank"]), alpha=float(spec["alpha"]), target_modules=spec.get("target_modules")
        )
    else:
        verify_files(directory, manifest, [MODEL_FILE])
        tensors = _load(directory / MODEL_FILE, aliases)
        lora = None
    return StoredHfWeights(
        base_model=layout.get("base_model", ""),
        tensors=tensors,
        lora=lora,
        metadata=manifest.get("metadata", {}),
    )
