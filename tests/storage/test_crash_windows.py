"""Crash windows: every intermediate on-disk state of a save, an overwrite and a delete, recovered.

Each test builds the exact directories a writer killed at that point leaves (same names as
`tether.storage.atomic` makes) and opens the store as a restarted server does (recovery with no
age guard, since the server holds the data directory's lock). The checkpoint must then be either
the complete old one or the complete new one, never missing or half-written, and no work
directory may remain. Also: an edited manifest (LoRA alpha) and damaged files fail with a
non-retryable error that names the damage and no server path.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tether.storage import (
    CorruptCheckpointError,
    LocalCheckpointStore,
    LoraLayout,
    StoredHfWeights,
    StoredTrainingState,
)
from tether.storage.atomic import _DELETING, _OLD, _STAGING, _work_dir
from tether.storage.manifest import MANIFEST_NAME

RUN = "sess-1:train:0"
PATH = f"tinker://{RUN}/weights/ckpt"


def _state(value: float) -> StoredTrainingState:
    return StoredTrainingState(weights={"w": torch.full((4, 4), value)}, metadata={"v": value})


def _complete_copy(tmp_path: Path, value: float) -> Path:
    """A complete checkpoint directory (as a finished writer leaves its staging directory)."""
    scratch = LocalCheckpointStore(tmp_path / f"scratch-{value}")
    scratch.save_training_state(PATH, _state(value))
    return scratch.directory(PATH)


def _stage(store: LocalCheckpointStore, source: Path | None, *, partial: bool = False) -> Path:
    final = store.directory(PATH)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = _work_dir(final.parent, final.name, _STAGING)
    if source is not None:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        if partial:  # killed before the manifest (written last) and with a truncated weights file
            (staging / MANIFEST_NAME).unlink()
            weights = staging / "weights.safetensors"
            weights.write_bytes(weights.read_bytes()[:10])
    return staging


def _reopen(store: LocalCheckpointStore) -> LocalCheckpointStore:
    return LocalCheckpointStore(store.root, stale_after_s=0)


def _value(store: LocalCheckpointStore) -> float:
    return float(store.load_training_state(PATH).weights["w"][0, 0])


def _no_work_dirs(store: LocalCheckpointStore) -> bool:
    return not [p for p in store.root.rglob(".*") if p.is_dir()]


@pytest.mark.parametrize("partial", [True, False], ids=["writing", "written-not-committed"])
def test_new_save_killed_before_commit_leaves_nothing(tmp_path, partial):
    store = LocalCheckpointStore(tmp_path / "root")
    _stage(store, _complete_copy(tmp_path, 1.0), partial=partial)
    store = _reopen(store)
    assert not store.exists(PATH) and _no_work_dirs(store)


def test_overwrite_killed_while_writing_keeps_the_old(tmp_path):
    store = LocalCheckpointStore(tmp_path / "root")
    store.save_training_state(PATH, _state(1.0))
    _stage(store, _complete_copy(tmp_path, 2.0), partial=True)
    store = _reopen(store)
    assert _value(store) == 1.0 and _no_work_dirs(store)


def test_overwrite_killed_between_the_two_renames_restores_the_old(tmp_path):
    store = LocalCheckpointStore(tmp_path / "root")
    store.save_training_state(PATH, _state(1.0))
    final = store.directory(PATH)
    _stage(store, _complete_copy(tmp_path, 2.0))
    os.replace(final, _work_dir(final.parent, final.name, _OLD))  # first rename done, second not
    assert not store.exists(PATH)
    store = _reopen(store)
    assert _value(store) == 1.0 and _no_work_dirs(store)


def test_overwrite_killed_before_removing_the_retired_keeps_the_new(tmp_path):
    store = LocalCheckpointStore(tmp_path / "root")
    store.save_training_state(PATH, _state(1.0))
    final = store.directory(PATH)
    os.replace(final, _work_dir(final.parent, final.name, _OLD))
    shutil.copytree(_complete_copy(tmp_path, 2.0), final)
    store = _reopen(store)
    assert _value(store) == 2.0 and _no_work_dirs(store)


def test_delete_killed_after_its_rename_is_finished(tmp_path):
    store = LocalCheckpointStore(tmp_path / "root")
    store.save_training_state(PATH, _state(1.0))
    final = store.directory(PATH)
    os.replace(final, _work_dir(final.parent, final.name, _DELETING))
    store = _reopen(store)
    assert not store.exists(PATH) and _no_work_dirs(store)


def test_without_the_lock_young_work_is_left_for_its_writer(tmp_path):
    store = LocalCheckpointStore(tmp_path / "root")
    staging = _stage(store, _complete_copy(tmp_path, 1.0))
    LocalCheckpointStore(store.root)  # default age guard: another live process may be writing it
    assert staging.is_dir()


def _lora_checkpoint(tmp_path: Path) -> tuple[LocalCheckpointStore, str]:
    store = LocalCheckpointStore(tmp_path / "root")
    path = f"tinker://{RUN}/sampler_weights/s"
    a = torch.ones(2, 8)
    b = torch.zeros(8, 2)
    store.save_hf_weights(
        path,
        StoredHfWeights(
            base_model="m",
            lora=LoraLayout(rank=2, alpha=16.0),
            tensors={
                "model.layers.0.self_attn.q_proj.lora_A": a,
                "model.layers.0.self_attn.q_proj.lora_B": b,
            },
            metadata={"tether_lora_spec": {"rank": 2, "alpha": 16.0}},
        ),
    )
    return store, path


def test_an_edited_manifest_fails_to_load_without_naming_server_paths(tmp_path):
    store, path = _lora_checkpoint(tmp_path)
    manifest_path = store.directory(path) / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["metadata"]["tether_lora_spec"]["alpha"] = 1600.0  # the scale of every update, x100
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError) as caught:
        store.load_hf_weights(path)
    message = caught.value.message
    assert "manifest.json" in message and path in message and str(tmp_path) not in message
    assert caught.value.http_status == 422 and caught.value.http_status < 500  # the SDK does not retry it


def test_an_edited_adapter_config_fails_to_load(tmp_path):
    store, path = _lora_checkpoint(tmp_path)
    config_path = store.directory(path) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_alpha"] = 1600
    config_path.write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match="adapter_config.json") as caught:
        store.load_hf_weights(path)
    assert str(tmp_path) not in caught.value.message


def test_a_truncated_weights_file_names_the_damage(tmp_path):
    store = LocalCheckpointStore(tmp_path / "root")
    store.save_training_state(PATH, _state(1.0))
    weights = store.directory(PATH) / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3])
    with pytest.raises(CorruptCheckpointError, match="weights.safetensors is .* bytes") as caught:
        store.load_training_state(PATH)
    assert str(tmp_path) not in caught.value.message
