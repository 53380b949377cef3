"""Checkpoint files in the data directory, and `tinker://` checkpoint paths.

A checkpoint is a directory: `weights.safetensors` (+ `optimizer.safetensors` for training state)
and `metadata.json`. Training state (`weights/<name>`) can resume training, optimizer included;
sampler weights (`sampler_weights/<name>`) can be sampled or trained from (weights only);
external weights (`external_weights/<name>`) are Hugging Face format (a PEFT adapter for LoRA, a
full model directory otherwise). Writes go to a temporary directory renamed into place, so a crash
never leaves half a checkpoint under a real name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether.types.errors import NotFoundError, UserInputError

if TYPE_CHECKING:
    from tether.engine.model_loading import LoadedBaseModel
    from tether.engine.training_state import SamplerWeights, TrainingState

SEGMENT_TYPES = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600


def check_checkpoint_name(name: Any, *, field: str = "path") -> str:
    """A checkpoint name: letters, digits, `_ . -`; no `/`, no `..`."""
    if not isinstance(name, str) or not name:
        raise UserInputError("a checkpoint name is required", field=field)
    if "/" in name or "\\" in name or ".." in name or not _NAME_RE.match(name) or name.startswith("."):
        raise UserInputError(
            f"invalid checkpoint name {name!r}: use letters, digits, '_', '.', '-' (no '/' or '..')", field=field
        )
    return name


def check_ttl(ttl_seconds: int | None, *, field: str = "ttl_seconds") -> int | None:
    if ttl_seconds is None:
        return None
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise UserInputError(f"must be an integer number of seconds in 1..{MAX_TTL_SECONDS}", field=field)
    return ttl_seconds


@dataclass(frozen=True)
class CheckpointPath:
    """`tinker://<run_id>/<segment>/<name>`."""

    run_id: str
    segment: str
    name: str

    @property
    def checkpoint_id(self) -> str:
        return f"{self.segment}/{self.name}"

    @property
    def checkpoint_type(self) -> str:
        return SEGMENT_TYPES[self.segment]

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{self.segment}/{self.name}"


def parse_tinker_path(path: Any, *, field: str = "path") -> CheckpointPath:
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise UserInputError(f"expected a tinker:// checkpoint path, got {path!r}", field=field)
    parts = path[len("tinker://") :].split("/")
    if len(parts) != 3 or not parts[0] or parts[1] not in SEGMENT_TYPES:
        raise UserInputError(
            f"{path!r} is not tinker://<run_id>/(weights|sampler_weights|external_weights)/<name>", field=field
        )
    check_checkpoint_name(parts[2], field=field)
    return CheckpointPath(parts[0], parts[1], parts[2])


def parse_checkpoint_id(run_id: str, checkpoint_id: str) -> CheckpointPath:
    return parse_tinker_path(f"tinker://{run_id}/{checkpoint_id}", field="checkpoint_id")


def checkpoint_directory(data_dir: Path, owner: str, path: CheckpointPath) -> Path:
    return Path(data_dir) / "checkpoints" / owner / path.run_id.replace(":", "_") / path.segment / path.name


def _commit(tmp: Path, final: Path) -> int:
    size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return size


def _staging(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def _save_tensors(tensors: dict, file: Path) -> None:
    from safetensors.torch import save_file

    # clone: tied or sliced tensors share storage, which safetensors refuses
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(file))


def _load_tensors(file: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(file))


def save_training_state(directory: Path, state: TrainingState) -> int:
    """Write a training state; returns its size in bytes."""
    tmp = _staging(directory)
    try:
        _save_tensors(state.weights, tmp / "weights.safetensors")
        if state.optimizer is not None:
            _save_tensors(state.optimizer, tmp / "optimizer.safetensors")
        (tmp / "metadata.json").write_text(json.dumps({"kind": "training_state", **state.metadata}))
        return _commit(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_metadata(directory: Path) -> dict[str, Any]:
    file = Path(directory) / "metadata.json"
    if not file.exists():
        raise NotFoundError(f"checkpoint files are missing at {directory}")
    return json.loads(file.read_text())


def load_training_state(directory: Path, *, include_optimizer: bool) -> TrainingState:
    from tether.engine.training_state import TrainingState

    metadata = read_metadata(directory)
    if metadata.get("kind") != "training_state":
        raise UserInputError("this checkpoint holds sampler weights, not training state", field="path")
    metadata = {k: v for k, v in metadata.items() if k != "kind"}
    optimizer = None
    if include_optimizer:
        opt_file = Path(directory) / "optimizer.safetensors"
        if not opt_file.exists():
            raise UserInputError("this checkpoint was saved without optimizer state", field="optimizer")
        optimizer = _load_tensors(opt_file)
    return TrainingState(weights=_load_tensors(Path(directory) / "weights.safetensors"), optimizer=optimizer,
                         metadata=metadata)


def save_sampler_weights(directory: Path, weights: SamplerWeights) -> int:
    from dataclasses import asdict

    tmp = _staging(directory)
    try:
        _save_tensors(weights.tensors, tmp / "weights.safetensors")
        meta = {
            "kind": "sampler_weights",
            "base_model": weights.base_model,
            "is_lora": weights.is_lora,
            "lora": asdict(weights.lora_spec) if weights.lora_spec is not None else None,
        }
        (tmp / "metadata.json").write_text(json.dumps(meta))
        return _commit(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_sampler_weights(directory: Path) -> SamplerWeights:
    """Sampler weights from a sampler checkpoint or from a training-state checkpoint."""
    from tether.engine.lora import LoraSpec
    from tether.engine.training_state import SamplerWeights

    meta = read_metadata(directory)
    lora = meta.get("lora") if meta.get("is_lora") else None
    spec = LoraSpec(**lora) if lora else None
    return SamplerWeights(base_model=meta.get("base_model", ""), lora_spec=spec,
                          tensors=_load_tensors(Path(directory) / "weights.safetensors"))


def save_external_weights(directory: Path, weights: SamplerWeights, base: LoadedBaseModel) -> int:
    """Hugging Face format: a PEFT adapter (LoRA) or a full model directory with tokenizer files."""
    tmp = _staging(directory)
    try:
        if weights.lora_spec is not None:
            spec = weights.lora_spec
            modules = sorted({k.rsplit(".", 1)[0].rsplit(".", 1)[-1] for k in weights.tensors})
            _save_tensors({f"base_model.model.{k.replace('.lora_A', '.lora_A.weight').replace('.lora_B', '.lora_B.weight')}": v
                           for k, v in weights.tensors.items()}, tmp / "adapter_model.safetensors")
            config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
                      "target_modules": modules, "base_model_name_or_path": str(base.path), "bias": "none",
                      "lora_dropout": 0.0}
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        else:
            _save_tensors(weights.tensors, tmp / "model.safetensors")
            shutil.copy(Path(base.path) / "config.json", tmp / "config.json")
        for file in Path(base.tokenizer_path).glob("*"):
            if file.is_file() and (file.name.startswith("tokenizer") or file.name in ("special_tokens_map.json", "vocab.json", "merges.txt")):
                shutil.copy(file, tmp / file.name)
        return _commit(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
