"""What a training model's state looks like outside the engine: for checkpoints and for samplers.

Both are plain tensors plus JSON-able metadata, so storage can write them in any format without
knowing the engine. Tensors are detached copies: later training never changes an exported state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tether.engine.lora import LoraSpec
from tether.types.errors import UserInputError

STATE_FORMAT = "tether.training_state/1"


@dataclass
class TrainingState:
    """A training model's weights, optionally its optimizer moments, and how to rebuild it."""

    weights: dict[str, torch.Tensor]
    """LoRA: `<module path>.lora_A/.lora_B`; full fine-tuning: the model's named parameters."""
    optimizer: dict[str, torch.Tensor] | None = None
    """`exp_avg.<name>`, `exp_avg_sq.<name>`, `step.<name>`, and `master.<name>` (the fp32 master of a
    bf16/fp16 weight, see `tether.engine.optimizer`); None when exported without optimizer."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """JSON-able: format, base_model, is_lora, lora (spec fields or None), optimizer_steps."""

    @property
    def lora_spec(self) -> LoraSpec | None:
        """The adapter spec recorded in the metadata (None for full fine-tuning)."""
        if self.metadata.get("format") != STATE_FORMAT:
            raise UserInputError(
                f"unknown training state format {self.metadata.get('format')!r}", field="state.metadata"
            )
        spec = self.metadata.get("lora")
        if not self.metadata.get("is_lora"):
            return None
        if not isinstance(spec, dict):
            raise UserInputError("LoRA state without a LoRA spec", field="state.metadata")
        try:
            return LoraSpec(**spec)
        except TypeError as exc:
            raise UserInputError(f"invalid LoRA spec {spec!r}", field="state.metadata") from exc


def lora_spec_metadata(spec: LoraSpec | None) -> dict[str, Any] | None:
    """The JSON form of a LoRA spec, as stored in `TrainingState.metadata["lora"]`."""
    return asdict(spec) if spec is not None else None


@dataclass(frozen=True)
class SamplerWeights:
    """A frozen copy of a training model's weights, ready to register with a sampling engine."""

    base_model: str
    """Name of the base model the weights belong to."""
    lora_spec: LoraSpec | None
    """The adapter's spec; None for full fine-tuning."""
    tensors: dict[str, torch.Tensor]
    """LoRA: PEFT-style `<module path>.lora_A/.lora_B`; full: the model's state dict (plain HF names)."""

    @property
    def is_lora(self) -> bool:
        return self.lora_spec is not None
