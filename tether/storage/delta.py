"""Exact weight deltas, for shipping a new version of weights to a deployment that has the old one.

A delta turns one state dict (the base) into another (the target) bit for bit. Tensors of the same
name, shape and dtype are stored as the XOR of their raw bits: an optimizer step moves weights a
little, so sign, exponent and high mantissa bits mostly cancel to zero and the zstd-compressed XOR
is much smaller than the tensor. New tensors and tensors whose shape or dtype changed are stored
whole; unchanged tensors cost almost nothing. Both sides are fingerprinted (sha256 over names,
dtypes, shapes and bytes), so a delta applied to the wrong base fails loudly instead of producing
garbage weights.

On disk a delta is a directory holding `delta.safetensors` (zstd-compressed byte planes of the
XOR, see `write_delta`) and a manifest (kind `weights_delta`), written atomically like every
checkpoint (`save_delta` / `load_delta`). Sampler checkpoint chains (base, delta, merged base)
built on this live in `tether.storage.sampler_chain`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from tether.storage.atomic import atomic_directory
from tether.storage.manifest import CorruptCheckpointError, read_manifest, verify_files, write_manifest
from tether.types.errors import ConflictError

__all__ = [
    "WEIGHTS_DELTA_KIND",
    "WeightsDelta",
    "DeltaBaseMismatchError",
    "DELTA_FILE",
    "fingerprint",
    "compute_delta",
    "apply_delta",
    "write_delta",
    "read_delta",
    "save_delta",
    "load_delta",
]

WEIGHTS_DELTA_KIND = "weights_delta"
DELTA_FILE = "delta.safetensors"
DELTA_ENCODING = "xor_byteplanes_zstd/1"
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_ZSTD_LEVEL = 3


class DeltaBaseMismatchError(ConflictError):
    """The weights a delta is applied to are not the weights it was computed from."""


@dataclass
class WeightsDelta:
    """What turns the base state dict into the target one."""

    xor: dict[str, torch.Tensor]
    """Bitwise XOR (as same-width integers) of base and target, per tensor kept in shape and dtype."""
    whole: dict[str, torch.Tensor]
    """Target tensors stored in full: new names, or a changed shape or dtype."""
    removed: list[str]
    """Names in the base that the target no longer has."""
    base_fingerprint: str
    target_fingerprint: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return _cpu(tensor).view(_INT_OF_WIDTH[tensor.element_size()])


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = _cpu(tensors[name])
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def compute_delta(
    base: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *, metadata: dict[str, Any] | None = None
) -> WeightsDelta:
    """The delta from `base` to `target` (neither is modified)."""
    xor: dict[str, torch.Tensor] = {}
    whole: dict[str, torch.Tensor] = {}
    for name, new in target.items():
        old = base.get(name)
        if (
            old is not None
            and old.shape == new.shape
            and old.dtype == new.dtype
            and new.element_size() in _INT_OF_WIDTH
        ):
            xor[name] = torch.bitwise_xor(_bits(old), _bits(new))
        else:
            whole[name] = _cpu(new).clone()
    return WeightsDelta(
        xor=xor,
        whole=whole,
        removed=sorted(set(base) - set(target)),
        base_fingerprint=fingerprint(base),
        target_fingerprint=fingerprint(target),
        metadata=dict(metadata or {}),
    )


def apply_delta(base: dict[str, torch.Tensor], delta: WeightsDelta) -> dict[str, torch.Tensor]:
    """The target state dict (new CPU tensors; `base` is not modified).

    Raises DeltaBaseMismatchError if `base` is not the delta's base, and checks the result against
    the target fingerprint.
    """
    if fingerprint(base) != delta.base_fingerprint:
        raise DeltaBaseMismatchError("these weights are not the base this delta was computed from")
    result: dict[str, torch.Tensor] = {}
    for name, old in base.items():
        if name in delta.removed:
            continue
        if name in delta.xor:
            old_cpu = _cpu(old)
            result[name] = torch.bitwise_xor(_bits(old_cpu), delta.xor[name]).view(old_cpu.dtype)
        elif name not in delta.whole:
            result[name] = _cpu(old).clone()
    result.update({name: tensor.clone() for name, tensor in delta.whole.items()})
    if fingerprint(result) != delta.target_fingerprint:
        raise DeltaBaseMismatchError("applying the delta did not reproduce its target weights")
    return result


def _planes(tensors: list[torch.Tensor], width: int) -> list[bytes]:
    """Byte plane k of every tensor (its k-th byte of each element), concatenated in order."""
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors]) if tensors else torch.empty(0, dtype=torch.uint8)
    by_element = flat.view(-1, width).numpy()
    return [by_element[:, k].tobytes() for k in range(width)]


def _unplanes(planes: list[bytes], width: int) -> torch.Tensor:
    """Inverse of `_planes`: the interleaved bytes, as a flat uint8 tensor."""
    columns = [np.frombuffer(plane, dtype=np.uint8) for plane in planes]
    return torch.from_numpy(np.ascontiguousarray(np.stack(columns, axis=1))).reshape(-1)


def write_delta(directory: Path, delta: WeightsDelta) -> dict[str, Any]:
    """Write the delta's file into `directory`; returns the manifest `layout` to record.

    Encoding `xor_byteplanes_zstd/1`: XOR tensors are grouped by element width; within a group
    the XOR bytes are split into byte planes (all first bytes, all second bytes, ...) and each
    plane is zstd-compressed on its own. An optimizer step leaves the sign, exponent and high
    mantissa bytes of the XOR almost all zero, so those planes shrink to nearly nothing, while
    plain zstd over interleaved bytes sees a 2- or 4-byte period it compresses poorly. Whole
    tensors go into one zstd-compressed safetensors blob.
    """
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    blobs: dict[str, torch.Tensor] = {}
    order: list[list[Any]] = []
    by_width: dict[int, list[str]] = {}
    for name in sorted(delta.xor):
        by_width.setdefault(delta.xor[name].element_size(), []).append(name)
    uncompressed = 0
    for width, names in sorted(by_width.items()):
        tensors = [delta.xor[name].contiguous() for name in names]
        order.extend([name, width, list(t.shape)] for name, t in zip(names, tensors, strict=True))
        for k, plane in enumerate(_planes(tensors, width)):
            uncompressed += len(plane)
            blobs[f"planes/{width}/{k}"] = torch.frombuffer(bytearray(compressor.compress(plane)), dtype=torch.uint8)
    whole = save_safetensors({n: t.contiguous() for n, t in delta.whole.items()}) if delta.whole else b""
    if whole:
        blobs["whole"] = torch.frombuffer(bytearray(compressor.compress(whole)), dtype=torch.uint8)
    container = save_safetensors(blobs, metadata={"format": "pt"}) if blobs else b""
    (Path(directory) / DELTA_FILE).write_bytes(container)
    return {
        "encoding": DELTA_ENCODING,
        "xor_tensors": order,
        "whole_bytes": len(whole),
        "removed": delta.removed,
        "base_fingerprint": delta.base_fingerprint,
        "target_fingerprint": delta.target_fingerprint,
        "uncompressed_bytes": uncompressed + len(whole),
    }


def read_delta(directory: Path, manifest: dict[str, Any]) -> WeightsDelta:
    """Verify and read a delta written by `write_delta` (CorruptCheckpointError if damaged)."""
    verify_files(directory, manifest, [DELTA_FILE])
    layout = manifest.get("layout", {})
    if layout.get("encoding") != DELTA_ENCODING:
        raise CorruptCheckpointError(f"delta at {directory} has unknown encoding {layout.get('encoding')!r}")
    data = (Path(directory) / DELTA_FILE).read_bytes()
    blobs = load_safetensors(data) if data else {}
    decompressor = zstandard.ZstdDecompressor()
    try:
        xor: dict[str, torch.Tensor] = {}
        by_width: dict[int, list[tuple[str, list[int]]]] = {}
        for name, width, shape in layout["xor_tensors"]:
            by_width.setdefault(int(width), []).append((name, shape))
        for width, entries in by_width.items():
            planes = [decompressor.decompress(blobs[f"planes/{width}/{k}"].numpy().tobytes()) for k in range(width)]
            flat = _unplanes(planes, width)
            offset = 0
            for name, shape in entries:
                count = math.prod(shape) * width
                xor[name] = flat[offset : offset + count].clone().view(_INT_OF_WIDTH[width]).reshape(shape)
                offset += count
            if offset != flat.numel():
                raise ValueError("byte planes longer than the tensors they encode")
        whole = {}
        if "whole" in blobs:
            whole = load_safetensors(
                decompressor.decompress(blobs["whole"].numpy().tobytes(), max_output_size=int(layout["whole_bytes"]))
            )
    except (KeyError, ValueError, RuntimeError, zstandard.ZstdError) as exc:
        raise CorruptCheckpointError(f"delta at {directory} cannot be decoded: {exc}") from exc
    return WeightsDelta(
        xor=xor,
        whole=whole,
        removed=list(layout.get("removed", [])),
        base_fingerprint=layout["base_fingerprint"],
        target_fingerprint=layout["target_fingerprint"],
        metadata=manifest.get("metadata", {}),
    )


def save_delta(directory: Path, delta: WeightsDelta, *, overwrite: bool = False) -> None:
    """Write `delta` as its own directory, atomically (see `tether.storage.atomic`)."""
    with atomic_directory(Path(directory), overwrite=overwrite) as staging:
        layout = write_delta(staging, delta)
        write_manifest(staging, kind=WEIGHTS_DELTA_KIND, metadata=delta.metadata, layout=layout)


def load_delta(directory: Path) -> WeightsDelta:
    """Read a delta directory written by `save_delta` (checksums verified)."""
    manifest = read_manifest(Path(directory))
    if manifest["kind"] != WEIGHTS_DELTA_KIND:
        raise ValueError(f"{directory} holds {manifest['kind']}, not a weights delta")
    return read_delta(Path(directory), manifest)
