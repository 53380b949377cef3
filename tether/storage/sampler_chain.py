"""Sampler checkpoint chains: a full base, then small exact deltas against it, for weight sync.

A chain lives in one training run's `sampler_weights/` directory:

* **base** — full weights in the usual Hugging Face layout (`tether.storage.formats`): a PEFT
  adapter for LoRA, `model.safetensors` for full fine-tuning. Loadable anywhere.
* **merged_base** — a LoRA folded into the base model's full weights (`W + alpha/r · B @ A`),
  exported as a full Hugging Face model, so servers without LoRA support load it.
* **delta** — the exact bit difference of the new weights against the chain's previous checkpoint
  (its parent: the base or the last delta), compressed by `tether.storage.delta`, plus the base
  model's config and tokenizer files. Its manifest names the parent and the sha256 fingerprints
  of the parent's weights and of the result, so a delta applied to anything but its parent fails
  loudly and the rebuilt weights are verified bit for bit.

Every checkpoint of a chain records its place in its own manifest (`layout["chain"]`: type,
identity, base identity, index, fingerprints). The head of a run's chain is found by reading those
manifests, so the bookkeeping survives a restart without any catalogue. Deltas are taken against
the previous checkpoint because one optimizer step changes weights far less than many do (full ÷
delta in bench/delta_size.py, one later AdamW step vs 20 steps against one base: fp32 weights
2.4x vs 1.7x at lr 1e-5, 1.8x vs 1.5x at lr 1e-4; bf16 weights, a GPU's default, 40x vs 18x and
6x vs 2.8x; the very first step, nearly lr·sign(grad), is 10-56x); the price is that a delta rebuilds only from its parent, so a deployment applies the chain in order
and a fresh base now and then bounds the chain (WeightSyncer's `rebase_every`).

This module knows storage formats and tensors, never the engine or a server.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from tether.storage.delta import (
    DELTA_FILE,
    WEIGHTS_DELTA_KIND,
    apply_delta,
    compute_delta,
    fingerprint,
    read_delta,
    write_delta,
)
from tether.storage.formats import (
    _BASE_CONFIG_FILES,
    _TOKENIZER_FILES,
    HF_WEIGHTS_KIND,
    StoredHfWeights,
    _copy_named,
    read_hf_weights,
    write_hf_weights,
)
from tether.storage.manifest import CorruptCheckpointError, read_manifest, verify_files, write_manifest
from tether.storage.store import CheckpointInfo, CheckpointRef, CheckpointStore, parse_ref, require_kind
from tether.types.errors import NotFoundError, UserInputError

__all__ = [
    "CHECKPOINT_TYPES",
    "SAMPLER_DELTA_KIND",
    "CheckpointType",
    "ChainLink",
    "SamplerCheckpoint",
    "SavedSamplerCheckpoint",
    "save_sampler_checkpoint_ext",
    "chain_head",
    "read_chain_link",
    "read_sampler_checkpoint_dir",
    "load_sampler_checkpoint",
    "merge_lora",
    "read_base_state_dict",
]

CheckpointType = Literal["base", "delta", "merged_base"]
CHECKPOINT_TYPES: tuple[str, ...] = ("base", "delta", "merged_base")
SAMPLER_DELTA_KIND = WEIGHTS_DELTA_KIND
_CHAIN = "chain"


@dataclass(frozen=True)
class ChainLink:
    """Where one sampler checkpoint sits in its chain (stored as `layout["chain"]` in its manifest)."""

    checkpoint_type: str
    """"base", "delta" or "merged_base"."""
    identity: str
    """This checkpoint's `tinker://` path."""
    base_identity: str
    """The chain base's `tinker://` path (== identity for a base or merged base)."""
    index: int
    """0 for a base; a delta's position after its base (1, 2, ...)."""
    weights_fingerprint: str
    """`tether.storage.delta.fingerprint` of the weights this checkpoint holds or rebuilds."""
    base_fingerprint: str
    """The base's weights fingerprint (== weights_fingerprint for a base)."""
    is_lora: bool
    """The weights are LoRA adapter tensors (base or delta of an adapter)."""
    base_model: str = ""
    parent_identity: str = ""
    """A delta: the checkpoint it applies to (the chain's previous one); "" for a base."""
    parent_fingerprint: str = ""
    """A delta: the weights fingerprint of its parent."""

    @staticmethod
    def from_layout(layout: Mapping[str, Any], where: str) -> ChainLink:
        raw = layout.get(_CHAIN)
        if not isinstance(raw, dict):
            raise UserInputError(f"{where} is not part of a sampler checkpoint chain", field="path")
        try:
            return ChainLink(**raw)
        except TypeError as exc:
            raise CorruptCheckpointError(f"{where}: unreadable chain record {raw!r}") from exc


@dataclass(frozen=True)
class SavedSamplerCheckpoint:
    """What `save_sampler_checkpoint_ext` wrote."""

    info: CheckpointInfo
    link: ChainLink
    full_bytes: int
    """Bytes of the weights' tensors uncompressed (what a base of them would store)."""

    @property
    def checkpoint_type(self) -> str:
        return self.link.checkpoint_type

    @property
    def stored_bytes(self) -> int:
        return self.info.size_bytes


@dataclass
class SamplerCheckpoint:
    """One chain checkpoint read from its directory: full weights, or a delta to apply to its base."""

    link: ChainLink
    weights: StoredHfWeights | None = None
    """Base or merged base: the weights themselves."""
    delta_dir: Path | None = None
    """Delta: its directory (files verified); decoded against its parent by `rebuild`."""
    manifest: dict[str, Any] | None = None
    lora: Any = None
    """For a LoRA delta: the adapter layout (rank, alpha) recorded with it."""
    metadata: dict[str, Any] | None = None

    @property
    def is_delta(self) -> bool:
        return self.delta_dir is not None

    def rebuild(self, base_tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The delta's target tensors (bit exact) from its parent's tensors; DeltaBaseMismatchError if
        `base_tensors` are not its parent's."""
        if self.delta_dir is None or self.manifest is None:
            raise ValueError("only a delta is rebuilt from a base")
        base = dict(base_tensors)
        delta = read_delta(self.delta_dir, self.manifest, base)
        return apply_delta(base, delta, check_base=False)


# ------------------------------------------------------------------ merge


def merge_lora(
    base_state_dict: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """Full weights with a LoRA folded in: `W[m] + scale · B[m] @ A[m]` for each adapted module m.

    `adapter` holds `<module>.lora_A` (r × in) and `<module>.lora_B` (out × r); `<module>.weight`
    (out × in) must be in `base_state_dict`. Computed in float32, stored in the base weight's dtype.
    Unadapted tensors are shared, not copied. Raises UserInputError on a module the base lacks.
    """
    merged = dict(base_state_dict)
    modules = sorted({name.rpartition(".")[0] for name in adapter})
    for module in modules:
        key = f"{module}.weight"
        a, b = adapter.get(f"{module}.lora_A"), adapter.get(f"{module}.lora_B")
        if a is None or b is None:
            raise UserInputError(f"LoRA module {module!r} needs both lora_A and lora_B", field="tensors")
        if key not in base_state_dict:
            raise UserInputError(f"LoRA module {module!r} has no {key!r} in the base model", field="tensors")
        weight = base_state_dict[key]
        update = scale * (b.detach().cpu().float() @ a.detach().cpu().float())
        if tuple(update.shape) != tuple(weight.shape):
            raise UserInputError(
                f"LoRA update of {module!r} has shape {tuple(update.shape)}, weight {tuple(weight.shape)}",
                field="tensors",
            )
        merged[key] = (weight.detach().cpu().float() + update).to(weight.dtype)
    return merged


def read_base_state_dict(base_model_dir: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face model directory's weights (every `*.safetensors` shard), tied head included.

    When the config ties the output embedding and no `lm_head.weight` is stored, the input
    embedding is added under that name (the same tensor), so a LoRA on lm_head can be merged.
    """
    directory = Path(base_model_dir)
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise NotFoundError(f"no *.safetensors weights in {directory}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(str(shard)))
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config.get("tie_word_embeddings") and "lm_head.weight" not in tensors:
        embed = [name for name in tensors if name.endswith("embed_tokens.weight")]
        if len(embed) == 1:
            tensors["lm_head.weight"] = tensors[embed[0]]
    return tensors


# ------------------------------------------------------------------ chain lookup


def read_chain_link(directory: Path) -> ChainLink:
    """The chain record of the checkpoint in `directory` (UserInputError if it is not in a chain)."""
    return ChainLink.from_layout(read_manifest(Path(directory)).get("layout", {}), str(directory))


def chain_head(store: CheckpointStore, training_run_id: str) -> ChainLink | None:
    """The newest chain checkpoint of a run's sampler weights, or None if it has none."""
    head = None
    for info in store.list(training_run_id):
        if info.path.kind != "sampler":
            continue
        with store._checkout(info.path, info.format, "a sampler checkpoint") as (_, manifest):
            raw = manifest.get("layout", {}).get(_CHAIN)
        if isinstance(raw, dict):
            head = ChainLink(**raw)  # list() is oldest first: the last one wins
    return head


_cache_lock = threading.Lock()
_cache: dict[str, dict[str, torch.Tensor]] = {}
"""Full tensors of the last chain checkpoints saved or rebuilt, by weights fingerprint (two kept)."""
_CACHE_SIZE = 2


def _remember(weights_fingerprint: str, tensors: dict[str, torch.Tensor]) -> None:
    with _cache_lock:
        _cache.pop(weights_fingerprint, None)
        _cache[weights_fingerprint] = tensors
        while len(_cache) > _CACHE_SIZE:
            _cache.pop(next(iter(_cache)))


def _chain_link(store: CheckpointStore, identity: str) -> tuple[ChainLink, str]:
    path = parse_ref(identity)
    info = store.info(path)
    with store._checkout(path, info.format, "a sampler checkpoint") as (_, manifest):
        return ChainLink.from_layout(manifest.get("layout", {}), identity), info.format


def _weights_of(store: CheckpointStore, link: ChainLink) -> dict[str, torch.Tensor]:
    """The full tensors a chain checkpoint holds: read (a base) or rebuilt from its parents (a delta)."""
    with _cache_lock:
        cached = _cache.get(link.weights_fingerprint)
    if cached is not None:
        return cached
    path = parse_ref(link.identity)
    if link.checkpoint_type == "delta":
        parent, _ = _chain_link(store, link.parent_identity)
        parent_tensors = _weights_of(store, parent)
        with store._checkout(path, SAMPLER_DELTA_KIND, "a delta sampler checkpoint") as (directory, _):
            tensors = read_sampler_checkpoint_dir(directory).rebuild(parent_tensors)
    else:
        with store._checkout(path, HF_WEIGHTS_KIND, "a base sampler checkpoint") as (directory, manifest):
            tensors = read_hf_weights(directory, manifest).tensors
        if fingerprint(tensors) != link.weights_fingerprint:
            raise CorruptCheckpointError(
                f"base checkpoint {link.identity} does not hold the weights its chain recorded"
            )
    _remember(link.weights_fingerprint, tensors)
    return tensors


# ------------------------------------------------------------------ save


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu() for name, t in tensors.items()}


def _full_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors.values():
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset())) if t.numel() else (id(t), 0)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def save_sampler_checkpoint_ext(
    store: CheckpointStore,
    ref: CheckpointRef,
    weights: StoredHfWeights,
    *,
    checkpoint_type: str | None = None,
    base_model_dir: Path | None = None,
    tokenizer_dir: Path | None = None,
    base_state_dict: Mapping[str, torch.Tensor] | None = None,
    overwrite: bool = False,
) -> SavedSamplerCheckpoint:
    """Write sampler weights as a chain checkpoint under a `sampler_weights/` path.

    `checkpoint_type`: "base" (full weights, starts a new chain), "delta" (exact difference to the
    run's newest chain checkpoint, its parent), "merged_base" (LoRA folded into the full base weights, a new
    chain), or None = automatic: "delta" when the run already has a chain, else "base".
    A delta of a chain whose base is a merged base is taken on merged weights (LoRA folded in).

    `base_model_dir`: the base model's HF directory (config.json copied beside full weights and
    deltas; its weights are read for merged_base unless `base_state_dict` is given).
    `tokenizer_dir`: tokenizer files to copy. Raises UserInputError for an unknown type, a delta
    with no chain to extend, merged_base of non-LoRA weights; ConflictError if `ref` is taken.
    """
    path = parse_ref(ref)
    require_kind(path, ("sampler",), "a sampler checkpoint")
    if checkpoint_type is not None and checkpoint_type not in CHECKPOINT_TYPES:
        raise UserInputError(
            f"checkpoint_type must be one of {', '.join(CHECKPOINT_TYPES)} or null, got {checkpoint_type!r}",
            field="checkpoint_type",
        )
    head = chain_head(store, path.training_run_id)
    kind = checkpoint_type or ("delta" if head is not None else "base")
    tensors = _cpu_tensors(weights.tensors)
    identity = path.tinker_path

    if kind == "merged_base" or (
        kind == "delta" and head is not None and not head.is_lora and weights.is_lora
    ):
        if weights.lora is None:
            raise UserInputError(
                "merged_base folds a LoRA adapter into the base; these weights are full",
                field="checkpoint_type",
            )
        if base_state_dict is None:
            if base_model_dir is None:
                raise ValueError("merged weights need base_state_dict or base_model_dir")
            base_state_dict = read_base_state_dict(base_model_dir)
        tensors = merge_lora(base_state_dict, tensors, weights.lora.alpha / weights.lora.rank)
        weights = StoredHfWeights(
            base_model=weights.base_model, tensors=tensors, lora=None, metadata=weights.metadata
        )
    weights_fp = fingerprint(tensors)
    full_bytes = _full_bytes(tensors)

    if kind in ("base", "merged_base"):
        link = ChainLink(
            kind, identity, identity, 0, weights_fp, weights_fp, weights.is_lora, weights.base_model
        )

        def write(staging: Path) -> None:
            layout = write_hf_weights(
                staging, weights, base_model_dir=base_model_dir, tokenizer_dir=tokenizer_dir
            )
            layout[_CHAIN] = asdict(link)
            write_manifest(staging, kind=HF_WEIGHTS_KIND, metadata=weights.metadata, layout=layout)

        info = store._save(path, write, overwrite=overwrite)
        _remember(weights_fp, tensors)
        return SavedSamplerCheckpoint(info=info, link=link, full_bytes=full_bytes)

    if head is None:
        raise UserInputError(
            f"run {path.training_run_id} has no base sampler checkpoint to take a delta "
            "against; save a base first",
            field="checkpoint_type",
        )
    if head.is_lora != weights.is_lora:
        raise UserInputError(
            "a delta must hold the same kind of weights as its base (LoRA adapter vs full)",
            field="checkpoint_type",
        )
    parent = _weights_of(store, head)
    # the parent's fingerprint was checked when it was read or rebuilt (or cached at its save)
    delta = compute_delta(
        parent, tensors, base_fingerprint=head.weights_fingerprint, target_fingerprint=weights_fp
    )
    link = ChainLink(
        "delta",
        identity,
        head.base_identity,
        head.index + 1,
        weights_fp,
        head.base_fingerprint,
        weights.is_lora,
        weights.base_model,
        parent_identity=head.identity,
        parent_fingerprint=head.weights_fingerprint,
    )

    def write_delta_dir(staging: Path) -> None:
        layout = write_delta(staging, delta, parent, check_base=False)
        layout[_CHAIN] = asdict(link)
        layout["base_model"] = weights.base_model
        if weights.lora is not None:
            layout["lora"] = asdict(weights.lora)
        _copy_named(base_model_dir, _BASE_CONFIG_FILES, staging)
        _copy_named(tokenizer_dir, _TOKENIZER_FILES, staging, prefix="tokenizer")
        write_manifest(staging, kind=SAMPLER_DELTA_KIND, metadata=weights.metadata, layout=layout)

    info = store._save(path, write_delta_dir, overwrite=overwrite)
    _remember(weights_fp, tensors)
    return SavedSamplerCheckpoint(info=info, link=link, full_bytes=full_bytes)


# ------------------------------------------------------------------ read


def read_sampler_checkpoint_dir(directory: Path) -> SamplerCheckpoint:
    """Read (and verify the files of) a chain checkpoint directory: a base, merged base or delta.

    NotFoundError if there is no checkpoint; UserInputError if it is not a chain checkpoint;
    CorruptCheckpointError if a file is missing, truncated or changed.
    """
    from tether.storage.formats import LoraLayout

    directory = Path(directory)
    manifest = read_manifest(directory)
    layout = manifest.get("layout", {})
    link = ChainLink.from_layout(layout, str(directory))
    if manifest["kind"] == HF_WEIGHTS_KIND:
        return SamplerCheckpoint(link=link, weights=read_hf_weights(directory, manifest))
    if manifest["kind"] == SAMPLER_DELTA_KIND:
        lora = LoraLayout(**layout["lora"]) if isinstance(layout.get("lora"), dict) else None
        verify_files(directory, manifest, [DELTA_FILE])
        return SamplerCheckpoint(
            link=link,
            delta_dir=directory,
            manifest=manifest,
            lora=lora,
            metadata=manifest.get("metadata", {}),
        )
    raise UserInputError(f"{directory} holds {manifest['kind']}, not sampler weights", field="path")


def load_sampler_checkpoint(store: CheckpointStore, ref: CheckpointRef) -> StoredHfWeights:
    """The full weights of any chain checkpoint (a delta is rebuilt from its base and verified)."""
    path = parse_ref(ref)
    with store._checkout(path, _kind_of(store, path), "sampler weights") as (directory, _):
        checkpoint = read_sampler_checkpoint_dir(directory)
    if checkpoint.weights is not None:
        return checkpoint.weights
    tensors = _weights_of(store, checkpoint.link)
    return StoredHfWeights(
        base_model=checkpoint.link.base_model,
        tensors=tensors,
        lora=checkpoint.lora,
        metadata=checkpoint.metadata or {},
    )


def _kind_of(store: CheckpointStore, path: Any) -> str:
    return store.info(path).format
