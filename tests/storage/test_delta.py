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
