"""Exact weight deltas, for shipping a new version of weights to a deployment that has the old one.

A delta turns one state dict (the base) into another (the target) bit for bit. Tensors of the same
name, shape and dtype are stored as the XOR of their raw bits: an optimizer step moves weights a
little, so sign, exponent and high mantissa bits mostly cancel to zero and the zstd-compressed XOR
is much smaller than the tensor. New tensors and tensors whose shape or dtype changed are stored
whole; unchanged tensors cost almost nothing. Both sides are fingerprinted (sha256 over names,
dtypes, shapes and bytes), so a delta applied to the wrong base fails loudly instead of producing
garbage weights.

On disk a delta is a directory holding `delta.safetensors` (the bit differences as zstd-compressed
byte planes, see `write_delta`; reading needs the base) and a manifest (kind `weights_delta`), written atomically like every
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
DELTA_ENCODING = "sub_sorted_byteplanes_zstd/2"
"""Written now. /2 adds `same_as` (a tensor whose bit difference equals an earlier one's, e.g. tied
embeddings saved under two names, is stored once); /1 (no `same_as`) still reads."""
_READABLE_ENCODINGS = ("sub_sorted_byteplanes_zstd/1", DELTA_ENCODING)
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
    base: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    *,
    metadata: dict[str, Any] | None = None,
    base_fingerprint: str | None = None,
    target_fingerprint: str | None = None,
) -> WeightsDelta:
    """The delta from `base` to `target` (neither is modified).

    Fingerprints the caller already has (of exactly these tensors) may be passed to skip hashing.
    """
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
        base_fingerprint=base_fingerprint or fingerprint(base),
        target_fingerprint=target_fingerprint or fingerprint(target),
        metadata=dict(metadata or {}),
    )


def apply_delta(
    base: dict[str, torch.Tensor], delta: WeightsDelta, *, check_base: bool = True
) -> dict[str, torch.Tensor]:
    """The target state dict (new CPU tensors; `base` is not modified).

    Raises DeltaBaseMismatchError if `base` is not the delta's base (`check_base=False` when the
    caller has just checked it, e.g. `read_delta`), and checks the result against the target
    fingerprint.
    """
    if check_base and fingerprint(base) != delta.base_fingerprint:
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


_UINT_OF_WIDTH = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT_NP_OF_WIDTH = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
_MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
"""Float dtypes whose elements are ordered by (sign, exponent) of the base before encoding."""


def _dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _unsigned(tensors: list[torch.Tensor], width: int) -> np.ndarray:
    """The raw bits of the tensors, concatenated, as unsigned integers of their width."""
    if not tensors:
        return np.zeros(0, dtype=_UINT_OF_WIDTH[width])
    flat = torch.cat([_cpu(t).reshape(-1).view(torch.uint8) for t in tensors])
    return flat.numpy().view(_UINT_OF_WIDTH[width])


def _order(a: np.ndarray, dtype: torch.dtype) -> np.ndarray | None:
    """Elements sorted by their base's sign and exponent (None: keep the order)."""
    bits = _MANTISSA_BITS.get(dtype)
    return None if bits is None else np.argsort(a >> bits, kind="stable")


def _zigzag(a: np.ndarray, b: np.ndarray, width: int) -> np.ndarray:
    """(b - a) modulo 2^bits as a signed number, zigzag-mapped to unsigned (small |d| -> small u)."""
    d = (b - a).view(_INT_NP_OF_WIDTH[width])
    shift = width * 8 - 1
    return ((d << 1) ^ (d >> shift)).view(_UINT_OF_WIDTH[width])


def _unzigzag(a: np.ndarray, u: np.ndarray, width: int) -> np.ndarray:
    one = _UINT_OF_WIDTH[width](1)
    d = (u >> one) ^ (np.zeros_like(u) - (u & one))
    return a + d


def _repeated(xor: dict[str, torch.Tensor]) -> dict[str, str]:
    """{name: earlier name} for bit differences equal (dtype, shape, bits) to an earlier one's."""
    first: dict[tuple[Any, ...], list[str]] = {}
    same_as: dict[str, str] = {}
    for name in sorted(xor):
        tensor = xor[name]
        flat = tensor.reshape(-1)
        key = (tensor.dtype, tuple(tensor.shape), tuple(flat[:8].tolist()), tuple(flat[-8:].tolist()))
        candidates = first.setdefault(key, [])
        source = next((c for c in candidates if torch.equal(xor[c], tensor)), None)
        if source is None:
            candidates.append(name)
        else:
            same_as[name] = source
    return same_as


def write_delta(
    directory: Path, delta: WeightsDelta, base: dict[str, torch.Tensor], *, check_base: bool = True
) -> dict[str, Any]:
    """Write the delta's file into `directory`; returns the manifest `layout` to record.

    Encoding `sub_sorted_byteplanes_zstd/2`, per dtype of the tensors kept in shape: the target's
    raw bits minus the base's (modulo 2^bits, zigzag-mapped so small moves either way are small
    numbers) — exactly the XOR's information, but an optimizer step becomes a small integer
    instead of a pattern of flipped bits. Float elements are ordered by the base's sign and
    exponent, so values whose steps span the same number of ULPs sit together (the order is
    recomputed from the base when reading, never stored). The result is split into byte planes
    (all lowest bytes, then the next, ...) and each plane is zstd-compressed on its own: high
    planes are nearly all zero and vanish. Whole tensors go into one zstd-compressed safetensors
    blob. A tensor whose bit difference equals an earlier one's (tied weights saved under two
    names) is not stored again: `same_as` names its source. `base` must be the delta's base
    (checked by fingerprint unless `check_base` is False).
    """
    if check_base and fingerprint(base) != delta.base_fingerprint:
        raise DeltaBaseMismatchError("these weights are not the base this delta was computed from")
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    blobs: dict[str, torch.Tensor] = {}
    groups: list[dict[str, Any]] = []
    same_as = _repeated(delta.xor)
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name in sorted(delta.xor):
        if name not in same_as:
            by_dtype.setdefault(_cpu(base[name]).dtype, []).append(name)
    uncompressed = 0
    for index, (dtype, names) in enumerate(sorted(by_dtype.items(), key=lambda item: str(item[0]))):
        width = base[names[0]].element_size()
        a = _unsigned([base[n] for n in names], width)
        b = a ^ _unsigned([delta.xor[n] for n in names], width)
        u = _zigzag(a, b, width)
        order = _order(a, dtype)
        if order is not None:
            u = u[order]
        columns = u.view(np.uint8).reshape(-1, width)
        for k in range(width):
            plane = np.ascontiguousarray(columns[:, k]).tobytes()
            uncompressed += len(plane)
            blobs[f"planes/{index}/{k}"] = torch.frombuffer(
                bytearray(compressor.compress(plane)), dtype=torch.uint8
            )
        groups.append(
            {"dtype": str(dtype), "width": width, "tensors": [[n, list(delta.xor[n].shape)] for n in names]}
        )
    whole = save_safetensors({n: t.contiguous() for n, t in delta.whole.items()}) if delta.whole else b""
    if whole:
        blobs["whole"] = torch.frombuffer(bytearray(compressor.compress(whole)), dtype=torch.uint8)
    (Path(directory) / DELTA_FILE).write_bytes(
        save_safetensors(blobs, metadata={"format": "pt"}) if blobs else b""
    )
    return {
        "encoding": DELTA_ENCODING,
        "groups": groups,
        "same_as": same_as,
        "whole_bytes": len(whole),
        "removed": delta.removed,
        "base_fingerprint": delta.base_fingerprint,
        "target_fingerprint": delta.target_fingerprint,
        "uncompressed_bytes": uncompressed + len(whole),
    }


def read_delta(directory: Path, manifest: dict[str, Any], base: dict[str, torch.Tensor]) -> WeightsDelta:
    """Verify and read a delta written by `write_delta`, against its base.

    DeltaBaseMismatchError if `base` is not the delta's base; CorruptCheckpointError if the file is
    damaged (its sha256 is checked first).
    """
    verify_files(directory, manifest, [DELTA_FILE])
    layout = manifest.get("layout", {})
    if layout.get("encoding") not in _READABLE_ENCODINGS:
        raise CorruptCheckpointError(f"delta at {directory} has unknown encoding {layout.get('encoding')!r}")
    if fingerprint(base) != layout.get("base_fingerprint"):
        raise DeltaBaseMismatchError("these weights are not the base this delta was computed from")
    data = (Path(directory) / DELTA_FILE).read_bytes()
    decompressor = zstandard.ZstdDecompressor()
    try:
        blobs = load_safetensors(data) if data else {}
        xor: dict[str, torch.Tensor] = {}
        for index, group in enumerate(layout["groups"]):
            width, dtype = int(group["width"]), _dtype_of(group["dtype"])
            names = [name for name, _ in group["tensors"]]
            a = _unsigned([base[n] for n in names], width)
            columns = np.empty((a.size, width), dtype=np.uint8)
            for k in range(width):
                plane = decompressor.decompress(
                    blobs[f"planes/{index}/{k}"].numpy().tobytes(), max_output_size=a.size
                )
                columns[:, k] = np.frombuffer(plane, dtype=np.uint8)
            u_sorted = columns.reshape(-1).view(_UINT_OF_WIDTH[width])
            order = _order(a, dtype)
            u = u_sorted if order is None else np.empty_like(u_sorted)
            if order is not None:
                u[order] = u_sorted
            x = a ^ _unzigzag(a, u, width)
            offset = 0
            for name, shape in group["tensors"]:
                count = math.prod(shape)
                xor[name] = (
                    torch.from_numpy(x[offset : offset + count].copy())
                    .view(_INT_OF_WIDTH[width])
                    .reshape(shape)
                )
                offset += count
        for name, source in layout.get("same_as", {}).items():
            if tuple(base[name].shape) != tuple(xor[source].shape):
                raise ValueError(f"{name!r} is recorded as the same as {source!r}, whose shape differs")
            xor[name] = xor[source]
        whole = {}
        if "whole" in blobs:
            whole = load_safetensors(
                decompressor.decompress(
                    blobs["whole"].numpy().tobytes(), max_output_size=int(layout["whole_bytes"])
                )
            )
    except (KeyError, ValueError, RuntimeError, TypeError, zstandard.ZstdError) as exc:
        raise CorruptCheckpointError(f"delta at {directory} cannot be decoded: {exc}") from exc
    return WeightsDelta(
        xor=xor,
        whole=whole,
        removed=list(layout.get("removed", [])),
        base_fingerprint=layout["base_fingerprint"],
        target_fingerprint=layout["target_fingerprint"],
        metadata=manifest.get("metadata", {}),
    )


def save_delta(
    directory: Path, delta: WeightsDelta, base: dict[str, torch.Tensor], *, overwrite: bool = False
) -> None:
    """Write `delta` (computed from `base`) as its own directory, atomically (see `tether.storage.atomic`)."""
    with atomic_directory(Path(directory), overwrite=overwrite) as staging:
        layout = write_delta(staging, delta, base)
        write_manifest(staging, kind=WEIGHTS_DELTA_KIND, metadata=delta.metadata, layout=layout)


def load_delta(directory: Path, base: dict[str, torch.Tensor]) -> WeightsDelta:
    """Read a delta directory written by `save_delta` against its base (checksums verified)."""
    manifest = read_manifest(Path(directory))
    if manifest["kind"] != WEIGHTS_DELTA_KIND:
        raise ValueError(f"{directory} holds {manifest['kind']}, not a weights delta")
    return read_delta(Path(directory), manifest, base)
