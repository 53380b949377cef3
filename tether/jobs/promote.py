"""Turn a job's sampler checkpoint into a standalone Hugging Face model directory.

`export_hf_model` writes the base model with the checkpoint's weights applied: a full-parameter
sampler save replaces the base's parameters; a LoRA save is merged (`W += alpha/rank * B @ A` on
every adapted layer, fp32), so the result needs no adapter support to load. A merged `lm_head` of a
model with tied embeddings is untied first (the embedding keeps the base's weights, as it did in
training). The tokenizer files are copied from the base; the directory is published atomically,
so a crash leaves either nothing or a complete model. Such a directory is what `tether serve
--models`, `model_aliases` and a trainer job's `base_model` accept (tether/engine/model_loading.py).

`PromotedModels` is the control plane's registry of promoted models: one directory per owner and
name under `<data_dir>/models/<owner>/<name>/`; a promoted name is a valid `base_model` for that
owner's jobs. It needs torch and transformers (imported when a model is exported).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import cast

from tether.types.errors import UserInputError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
PROMOTED_FILE = "tether_promoted.json"


def export_hf_model(weights, base_dir: Path, target: Path, *, provenance: dict) -> Path:
    """Write base model `base_dir` with the sampler `weights` (a `StoredHfWeights`) applied to `target`.

    Raises UserInputError if a weight names no parameter of the base or has another shape.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from tether.storage.atomic import atomic_directory

    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        if weights.is_lora:
            scale = weights.lora.alpha / weights.lora.rank
            for module in sorted({name.rsplit(".", 1)[0] for name in weights.tensors}):
                try:
                    layer = cast(torch.nn.Linear, model.get_submodule(module))
                except AttributeError:
                    raise UserInputError(
                        f"adapter layer {module!r} is not a layer of the base", field="checkpoint"
                    ) from None
                if layer is model.get_output_embeddings() and getattr(
                    model.config, "tie_word_embeddings", False
                ):
                    layer.weight = torch.nn.Parameter(
                        layer.weight.detach().clone()
                    )  # untie: the embedding stays
                    model.config.tie_word_embeddings = False
                delta = (
                    weights.tensors[f"{module}.lora_B"].float() @ weights.tensors[f"{module}.lora_A"].float()
                )
                if delta.shape != layer.weight.shape:
                    raise UserInputError(
                        f"adapter of {module!r} has shape {tuple(delta.shape)}, the layer "
                        f"{tuple(layer.weight.shape)}",
                        field="checkpoint",
                    )
                layer.weight.add_(delta * scale)
        else:
            unknown = sorted(set(weights.tensors) - set(model.state_dict()))
            if unknown:
                raise UserInputError(
                    f"weights {unknown[:3]} are not parameters of the base", field="checkpoint"
                )
            model.load_state_dict(weights.tensors, strict=False)
    with atomic_directory(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (base_dir / name).exists():
                shutil.copy2(base_dir / name, staging / name)
        (staging / PROMOTED_FILE).write_text(json.dumps(provenance, indent=2))
    return target


class PromotedModels:
    """Promoted models per owner under `<data_dir>/models/<owner>/<name>/`."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "models"

    def directory(self, owner: str, name: str) -> Path:
        return self.root / owner / name

    def aliases(self, owner: str) -> dict[str, str]:
        """name -> directory of every complete promoted model of `owner`."""
        base = self.root / owner
        if not base.is_dir():
            return {}
        return {d.name: str(d) for d in sorted(base.iterdir()) if (d / PROMOTED_FILE).exists()}

    def info(self, owner: str, name: str) -> dict:
        return json.loads((self.directory(owner, name) / PROMOTED_FILE).read_text())
