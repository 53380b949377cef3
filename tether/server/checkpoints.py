"""Where the server keeps checkpoints: one `tether.storage` store per owner, and the conversions
between the training engine's states and storage's engine-free formats.

Training state (`weights/<name>`) resumes training, optimizer included. Sampler weights
(`sampler_weights/<name>`) and external weights (`external_weights/<name>`) are Hugging Face format
(a PEFT adapter for LoRA, a full model otherwise), so they load outside tether too. Each owner has
its own directory tree, so one key's names never collide with, or reveal, another's.
"""

from __future__ import annotations

import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from tether.types.errors import NotFoundError, UserInputError
from tether.types.paths import ParsedCheckpointPath

if TYPE_CHECKING:  # storage and the engine need torch: imported on first use, so the server starts fast
    from tether.engine.model_loading import LoadedBaseModel
    from tether.engine.training_state import SamplerWeights, TrainingState
    from tether.storage import CheckpointInfo, LocalCheckpointStore

_LORA_SPEC_KEY = "tether_lora_spec"


class CheckpointFiles:
    """Owner-scoped checkpoint stores under `<data_dir>/checkpoints/<owner>/`."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "checkpoints"
        self._lock = threading.Lock()
        self._stores: dict[str, LocalCheckpointStore] = {}

    def store(self, owner: str) -> LocalCheckpointStore:
        from tether.storage import LocalCheckpointStore

        with self._lock:
            store = self._stores.get(owner)
            if store is None:
                store = self._stores[owner] = LocalCheckpointStore(self.root / owner)
            return store

    def directory(self, owner: str, path: ParsedCheckpointPath) -> Path:
        return self.store(owner).directory(path)

    def save_training_state(self, owner: str, path: ParsedCheckpointPath, state: TrainingState, *,
                            overwrite: bool) -> CheckpointInfo:
        from tether.storage import StoredTrainingState

        stored = StoredTrainingState(weights=state.weights, optimizer=state.optimizer, metadata=state.metadata)
        return self.store(owner).save_training_state(path, stored, overwrite=overwrite)

    def load_training_state(self, owner: str, path: ParsedCheckpointPath, *, include_optimizer: bool) -> TrainingState:
        from tether.engine.training_state import TrainingState

        stored = self.store(owner).load_training_state(path, include_optimizer=include_optimizer)
        if include_optimizer and stored.optimizer is None:
            raise UserInputError(f"{path} was saved without optimizer state", field="path")
        return TrainingState(weights=stored.weights, optimizer=stored.optimizer, metadata=stored.metadata)

    def save_hf_weights(self, owner: str, path: ParsedCheckpointPath, weights: SamplerWeights,
                        base: LoadedBaseModel, *, overwrite: bool = True) -> CheckpointInfo:
        """Sampler or external weights in Hugging Face layout (the LoRA spec is kept in the metadata)."""
        from tether.storage import LoraLayout, StoredHfWeights

        spec = weights.lora_spec
        stored = StoredHfWeights(
            base_model=weights.base_model,
            tensors=weights.tensors,
            lora=LoraLayout(rank=spec.rank, alpha=spec.alpha) if spec is not None else None,
            metadata={_LORA_SPEC_KEY: asdict(spec)} if spec is not None else {},
        )
        return self.store(owner).save_hf_weights(path, stored, overwrite=overwrite, base_model_dir=base.path,
                                                 tokenizer_dir=base.tokenizer_path)

    def load_sampler_weights(self, owner: str, path: ParsedCheckpointPath) -> SamplerWeights:
        """Weights to sample from, read from a sampler checkpoint or a LoRA training-state checkpoint."""
        from tether.engine.lora import LoraSpec
        from tether.engine.training_state import SamplerWeights

        if path.kind == "training":
            state = self.load_training_state(owner, path, include_optimizer=False)
            spec = state.lora_spec  # full fine-tuning (None): the weights carry plain Hugging Face names
            return SamplerWeights(base_model=str(state.metadata.get("base_model", "")), lora_spec=spec,
                                  tensors=state.weights)
        stored = self.store(owner).load_hf_weights(path)
        spec = None
        if stored.lora is not None:
            saved = stored.metadata.get(_LORA_SPEC_KEY)
            spec = LoraSpec(**saved) if isinstance(saved, dict) else LoraSpec(rank=stored.lora.rank,
                                                                                 alpha=stored.lora.alpha)
        return SamplerWeights(base_model=stored.base_model, lora_spec=spec, tensors=stored.tensors)

    def copy(self, source_owner: str, source: ParsedCheckpointPath, owner: str,
             destination: ParsedCheckpointPath) -> CheckpointInfo:
        """Copy a complete checkpoint (its manifest verifies the copy like the original)."""
        import shutil

        from tether.storage.atomic import atomic_directory

        source_dir = self.directory(source_owner, source)
        if not source_dir.is_dir():
            raise NotFoundError(f"checkpoint files of {source} are missing")
        store = self.store(owner)
        with atomic_directory(store.directory(destination)) as staging:
            shutil.copytree(source_dir, staging, dirs_exist_ok=True)
        return store.info(destination)

    def delete(self, owner: str, path: ParsedCheckpointPath) -> None:
        """Remove a checkpoint's files (already gone is fine: deletion is idempotent)."""
        try:
            self.store(owner).delete(path)
        except NotFoundError:
            pass
