"""Weight deltas: exact reconstruction, compression on small updates, and wrong-base detection."""

from __future__ import annotations

import pytest
import torch

from tether.storage.delta import (
    DeltaBaseMismatchError,
    apply_delta,
    compute_delta,
    fingerprint,
    load_delta,
    save_delta,
)


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(256, 64, generator=g),
        "proj": torch.randn(64, 64, generator=g).to(torch.bfloat16),
        "steps": torch.tensor([3], dtype=torch.int64),
        "dropped": torch.ones(4),
    }


def _step(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Like an optimizer step: every weight moves by ~1e-3 relative; one tensor reshaped, one new."""
    g = torch.Generator().manual_seed(7)
    target = {
        "embed": base["embed"] * (1 + 1e-3 * torch.randn(base["embed"].shape, generator=g)),
        "proj": (base["proj"].float() * (1 + 1e-2 * torch.randn(64, 64, generator=g))).to(torch.bfloat16),
        "steps": base["steps"] + 1,
        "new_head": torch.randn(8, 64, generator=g),
    }
    return target


def test_round_trip_is_bit_exact_and_smaller_than_the_weights(tmp_path):
    base = _weights()
    target = _step(base)
    delta = compute_delta(base, target, metadata={"version": 2})
    assert delta.removed == ["dropped"] and sorted(delta.whole) == ["new_head"]
    save_delta(tmp_path / "d", delta, base)
    loaded = load_delta(tmp_path / "d", base)
    assert loaded.metadata == {"version": 2}
    rebuilt = apply_delta(base, loaded)
    assert rebuilt.keys() == target.keys()
    for name, tensor in target.items():
        assert rebuilt[name].dtype == tensor.dtype
        assert torch.equal(rebuilt[name].view(torch.uint8), tensor.contiguous().view(torch.uint8)), name
    assert fingerprint(rebuilt) == fingerprint(target)
    stored = (tmp_path / "d" / "delta.safetensors").stat().st_size
    full = sum(t.numel() * t.element_size() for t in target.values())
    assert stored < 0.8 * full  # small updates leave the high bits equal, which zstd removes


def test_unchanged_weights_cost_almost_nothing(tmp_path):
    base = _weights()
    save_delta(tmp_path / "same", compute_delta(base, dict(base)), base)
    assert (tmp_path / "same" / "delta.safetensors").stat().st_size < 2_000


def test_wrong_base_is_refused(tmp_path):
    base = _weights()
    delta = compute_delta(base, _step(base))
    other = _weights(seed=1)
    with pytest.raises(DeltaBaseMismatchError):
        apply_delta(other, delta)
    assert torch.equal(other["embed"], _weights(seed=1)["embed"])  # inputs untouched


def _special(dtype: torch.dtype) -> torch.Tensor:
    """Values whose bit difference crosses sign, exponent and class boundaries: ±0, subnormals,
    ±inf, NaN, the largest and smallest normals."""
    info = torch.finfo(dtype)
    return torch.tensor(
        [
            0.0,
            -0.0,
            info.tiny,
            info.tiny / 4,
            -info.tiny,
            info.max,
            -info.max,
            float("inf"),
            -float("inf"),
            float("nan"),
            1.0,
            -1.0,
            info.eps,
            2.0 - info.eps,
        ],
        dtype=dtype,
    )


def _moved(dtype: torch.dtype, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    w = (0.02 * torch.randn(128, 96, generator=g)).to(dtype)
    if kind == "sparse":  # most elements keep their bits, as low-precision weights do at a small lr
        mask = torch.rand(w.shape, generator=g) < 0.05
        new = torch.where(mask, (w.float() * (1 + 1e-2 * torch.randn(w.shape, generator=g))).to(dtype), w)
    elif kind == "dense":
        new = (w.float() - 1e-3 * torch.randn(w.shape, generator=g)).to(dtype)
    else:  # every special value turned into every other one: carries through exponent and sign bits
        special = _special(dtype)
        w, new = special.repeat_interleave(special.numel()), special.repeat(special.numel())
    return {"w": w, "tied": w, "norm": torch.ones(96, dtype=dtype)}, {
        "w": new,
        "tied": new,
        "norm": torch.ones(96, dtype=dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["sparse", "dense", "special"])
def test_every_float_dtype_and_kind_of_move_round_trips_bit_exact(tmp_path, dtype, kind):
    base, target = _moved(dtype, kind)
    save_delta(tmp_path / "d", compute_delta(base, target), base)
    rebuilt = apply_delta(base, load_delta(tmp_path / "d", base))
    for name, tensor in target.items():
        assert rebuilt[name].dtype == dtype
        assert torch.equal(rebuilt[name].view(torch.uint8), tensor.view(torch.uint8)), name
    if kind == "sparse":  # 5% of elements move: 3 bits an element in fp32, < 1 in bf16 and fp16
        stored = (tmp_path / "d" / "delta.safetensors").stat().st_size
        assert stored < 0.12 * target["w"].numel() * target["w"].element_size()


def test_a_damaged_file_with_matching_checksums_fails_with_a_clear_error(tmp_path):
    """The decoder itself refuses bytes that are not a delta (checksums made to match, as a bug or
    an edit by hand would), naming the directory, rather than rebuilding garbage."""
    import json

    from tether.storage.manifest import CorruptCheckpointError, manifest_digest, sha256_file

    base, target = _moved(torch.bfloat16, "dense")
    directory = tmp_path / "d"
    save_delta(directory, compute_delta(base, target), base)
    data = directory / "delta.safetensors"
    raw = bytearray(data.read_bytes())
    for cut in (len(raw) // 2, len(raw) - 40):
        data.write_bytes(bytes(raw[:cut]) + bytes(len(raw) - cut))  # tail zeroed: zstd frames broken
        manifest = json.loads((directory / "manifest.json").read_text())
        manifest["files"]["delta.safetensors"]["sha256"] = sha256_file(data)
        manifest["digest"] = manifest_digest(manifest)
        (directory / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CorruptCheckpointError, match="cannot be decoded"):
            load_delta(directory, base)
