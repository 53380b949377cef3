"""The delta's on-disk format: deltas written by earlier versions still read bit for bit, unknown
encodings are refused, and the current encoding's choices (tied tensors stored once) hold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tether.storage.delta import (
    DELTA_ENCODING,
    apply_delta,
    compute_delta,
    fingerprint,
    load_delta,
    save_delta,
)
from tether.storage.manifest import CorruptCheckpointError, manifest_digest

DATA = Path(__file__).parent / "data"


def golden_pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Base and target weights from exact arithmetic only (the same on every machine)."""
    i = torch.arange(4096, dtype=torch.int64)
    embed = (((i * 37) % 1000) - 500).to(torch.float32).reshape(64, 64) / 1024
    step = (((i * 11) % 7) - 3).to(torch.float32).reshape(64, 64) / 2**20
    base = {
        "embed": embed,
        "head": embed.clone(),
        "proj": (embed[:16] * 3).to(torch.bfloat16),
        "count": torch.tensor([3], dtype=torch.int64),
        "dropped": torch.ones(4),
    }
    target = {
        "embed": embed + step,
        "head": embed + step,
        "proj": (embed[:16] * 3 + step[:16] * 64).to(torch.bfloat16),
        "count": torch.tensor([4], dtype=torch.int64),
        "new": torch.full((2, 3), 0.5),
    }
    return base, target


@pytest.mark.parametrize("version", ["delta_v1", "delta_v2"])
def test_deltas_of_earlier_versions_still_read(version):
    base, target = golden_pair()
    rebuilt = apply_delta(base, load_delta(DATA / version, base))
    assert fingerprint(rebuilt) == fingerprint(target)
    for name, tensor in target.items():
        assert torch.equal(rebuilt[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_an_unknown_encoding_is_refused(tmp_path):
    base, _ = golden_pair()
    copy = tmp_path / "d"
    shutil.copytree(DATA / "delta_v1", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["layout"]["encoding"] = "from_the_future/9"
    manifest["digest"] = manifest_digest(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match="unknown encoding"):
        load_delta(copy, base)


def test_a_tied_tensor_is_stored_once(tmp_path):
    base, target = golden_pair()
    save_delta(tmp_path / "d", compute_delta(base, target), base)
    layout = json.loads((tmp_path / "d" / "manifest.json").read_text())["layout"]
    assert layout["encoding"] == DELTA_ENCODING and layout["same_as"] == {"head": "embed"}
    assert "head" not in [name for group in layout["groups"] for name, _ in group["tensors"]]
    rebuilt = apply_delta(base, load_delta(tmp_path / "d", base))
    assert torch.equal(rebuilt["head"].view(torch.uint8), target["head"].view(torch.uint8))
