"""The trainer's side of checkpoints: the engine's states to storage's engine-free formats and back.

Training state (`weights/<name>`) resumes training, optimizer included. Sampler weights
(`sampler_weights/<name>`) and external weights (`external_weights/<name>`) are Hugging Face format
(a PEFT adapter for LoRA, a full model otherwise), so they load outside tether too. Files live in
the owner's store (`tether.storage.owners`); which checkpoints exist is the server's catalogue's
business, not this module's.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from tether.engine.lora import LoraSpec
from tether.engine.model_loading import LoadedBaseModel
from tether.engine.training_state import SamplerWeights, TrainingState
from tether.storage import CheckpointInfo, LoraLayout, StoredHfWeights, StoredTrainingState
from tether.storage.owners import OwnerStores
from tether.types.errors import UserInputError
from tether.types.paths import ParsedCheckpointPath

LORA_SPEC_KEY = "tether_lora_spec"
"""Metadata key of a sampler checkpoint's full LoRA spec (PEFT's config keeps only rank and alpha)."""


class TrainerCheckpoints:
    """Reads and writes the engine's states as checkpoints in owner-scoped stores under `data_dir`."""

    def __init__(self, data_dir: Path) -> None:
        self.stores = OwnerStores(data_dir)

    def save_training_state(
        self, owner: str, path: ParsedCheckpointPath, state: TrainingState, *, overwrite: bool
    ) -> CheckpointInfo:
        stored = StoredTrainingState(
            weights=state.weights, optimizer=state.optimizer, metadata=state.metadata
        )
        return self.stores.store(owner).save_training_state(path, stored, overwrite=overwrite)

    def load_training_state(
        self, owner: str, path: ParsedCheckpointPath, *, include_optimizer: bool
    ) -> TrainingState:
        stored = self.stores.store(owner).load_training_state(path, include_optimizer=include_optimizer)
        if include_optimizer and stored.optimizer is None:
            raise UserInputError(f"{path} was saved without optimizer state", field="path")
        return TrainingState(weights=stored.weights, optimizer=stored.optimizer, metadata=stored.metadata)

    def save_hf_weights(
        self,
        owner: str,
        path: ParsedCheckpointPath,
        weights: SamplerWeights,
        base: LoadedBaseModel,
        *,
        overwrite: bool = True,
    ) -> CheckpointInfo:
        """Sampler or external weights in Hugging Face layout (the LoRA spec is kept in the metadata)."""
        return self.stores.store(owner).save_hf_weights(
            path,
            self.stored_hf_weights(weights),
            overwrite=overwrite,
            base_model_dir=base.path,
            tokenizer_dir=base.tokenizer_path,
        )

    @staticmethod
    def stored_hf_weights(weights: SamplerWeights) -> StoredHfWeights:
        """Storage's form of sampler weights (the full LoRA spec kept in the metadata)."""
        spec = weights.lora_spec
        return StoredHfWeights(
            base_model=weights.base_model,
            tensors=weights.tensors,
            lora=LoraLayout(rank=spec.rank, alpha=spec.alpha) if spec is not None else None,
            metadata={LORA_SPEC_KEY: asdict(spec)} if spec is not None else {},
        )

    def load_sampler_weights(self, owner: str, path: ParsedCheckpointPath) -> SamplerWeights:
        """Weights to sample from, read from a sampler checkpoint or a training-state checkpoint."""
        if path.kind == "training":
            state = self.load_training_state(owner, path, include_optimizer=False)
            spec = state.lora_spec  # full fine-tuning (None): the weights carry plain Hugging Face names
            return SamplerWeights(
                base_model=str(state.metadata.get("base_model", "")), lora_spec=spec, tensors=state.weights
            )
        stored = self.stores.store(owner).load_hf_weights(path)
        spec = None
        if stored.lora is not None:
            saved = stored.metadata.get(LORA_SPEC_KEY)
            spec = (
                LoraSpec(**saved)
                if isinstance(saved, dict)
                else LoraSpec(rank=stored.lora.rank, alpha=stored.lora.alpha)
            )
        return SamplerWeights(base_model=stored.base_model, lora_spec=spec, tensors=stored.tensors)
