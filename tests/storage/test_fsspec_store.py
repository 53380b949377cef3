"""FsspecCheckpointStore on fsspec's in-memory filesystem: versioned commits, crash safety, checksums."""

from __future__ import annotations

import uuid

import pytest
import torch

from tether.storage import (
    CorruptCheckpointError,
    FsspecCheckpointStore,
    LoraLayout,
    StoredHfWeights,
    StoredTrainingState,
)
from tether.types.errors import ConflictError, NotFoundError, UserInputError

PATH = "tinker://sess-9:train:1/weights/w"
SAMPLER = "tinker://sess-9:train:1/sampler_weights/s"


@pytest.fixture
def store() -> FsspecCheckpointStore:
    return FsspecCheckpointStore(f"memory://tether-test-{uuid.uuid4().hex}")


def _state(step: int) -> StoredTrainingState:
    return StoredTrainingState(
        weights={"a": torch.full((2, 3), float(step)), "b": torch.arange(4)},
        optimizer={"exp_avg.a": torch.ones(2, 3) * step},
        metadata={"step": step},
    )


def _versions(store: FsspecCheckpointStore, ref: str) -> list[str]:
    return [p.rsplit("/", 1)[-1] for p in store.fs.ls(store.directory(ref), detail=False) if "/v-" in p]


def test_round_trip_overwrite_list_delete(store):
    store.save_training_state(PATH, _state(1))
    with pytest.raises(ConflictError):
        store.save_training_state(PATH, _state(2))
    store.save_training_state(PATH, _state(2), overwrite=True)
    assert len(_versions(store, PATH)) == 1  # the replaced version is gone
    loaded = store.load_training_state(PATH, include_optimizer=True)
    assert loaded.metadata == {"step": 2}
    torch.testing.assert_close(loaded.weights["a"], torch.full((2, 3), 2.0))
    torch.testing.assert_close(loaded.optimizer["exp_avg.a"], torch.ones(2, 3) * 2)

    lora = {
        "model.layers.0.mlp.up_proj.lora_A": torch.randn(2, 4),
        "model.layers.0.mlp.up_proj.lora_B": torch.randn(5, 2),
    }
    info = store.save_hf_weights(SAMPLER, StoredHfWeights("base", lora, LoraLayout(2, 4.0)))
    assert info.is_lora and info.size_bytes > 0
    for name, tensor in store.load_hf_weights(SAMPLER).tensors.items():
        torch.testing.assert_close(tensor, lora[name])
    assert [i.tinker_path for i in store.list()] == [PATH, SAMPLER]
    assert [i.tinker_path for i in store.list("sess-9:train:1")] == [PATH, SAMPLER]
    assert store.list("other:train:0") == []

    store.delete(SAMPLER)
    assert not store.exists(SAMPLER) and not store.fs.exists(store.directory(SAMPLER))
    with pytest.raises(NotFoundError):
        store.delete(SAMPLER)
    with pytest.raises(NotFoundError):
        store.load_hf_weights(SAMPLER)
    with pytest.raises(UserInputError):
        store.load_hf_weights(PATH)


def test_failed_upload_keeps_old_version_and_leaves_nothing(store, monkeypatch):
    store.save_training_state(PATH, _state(1))
    before = _versions(store, PATH)
    real_put = store.fs.put_file
    calls = []

    def flaky_put(lpath, rpath, **kwargs):
        calls.append(rpath)
        if len(calls) == 2:
            raise OSError("connection reset")
        return real_put(lpath, rpath, **kwargs)

    monkeypatch.setattr(store.fs, "put_file", flaky_put)
    with pytest.raises(OSError, match="connection reset"):
        store.save_training_state(PATH, _state(2), overwrite=True)
    assert _versions(store, PATH) == before
    assert store.load_training_state(PATH).metadata == {"step": 1}


def test_orphan_version_from_a_crash_is_invisible_and_collected(store):
    store.save_training_state(PATH, _state(1))
    orphan = f"{store.directory(PATH)}/v-crashed"
    store.fs.pipe_file(f"{orphan}/weights.safetensors", b"partial")
    store.fs.pipe_file(
        f"{store.directory('tinker://x:train:0/weights/never')}/v-crashed/weights.safetensors", b"partial"
    )
    assert [i.tinker_path for i in store.list()] == [PATH]
    assert store.load_training_state(PATH).metadata == {"step": 1}
    assert store.collect_garbage(min_age_s=3600) == 0  # too young: might be a save in progress
    assert store.collect_garbage(min_age_s=0) == 2
    assert not store.fs.exists(orphan)
    assert store.load_training_state(PATH).metadata == {"step": 1}


def test_corrupted_object_is_detected(store):
    store.save_training_state(PATH, _state(1))
    (version,) = _versions(store, PATH)
    key = f"{store.directory(PATH)}/{version}/weights.safetensors"
    data = bytearray(store.fs.cat_file(key))
    data[-1] ^= 0x01
    store.fs.pipe_file(key, bytes(data))
    with pytest.raises(CorruptCheckpointError, match="weights.safetensors"):
        store.load_training_state(PATH)


def test_download_gives_a_local_hf_directory(store, tmp_path):
    lora = {"lm_head.lora_A": torch.randn(1, 3), "lm_head.lora_B": torch.randn(7, 1)}
    store.save_hf_weights(SAMPLER, StoredHfWeights("base", lora, LoraLayout(1, 1.0)))
    target = store.download(SAMPLER, tmp_path / "out")
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_files_stream_from_the_live_version(store):
    store.save_training_state(PATH, _state(1))
    store.save_training_state(PATH, _state(2), overwrite=True)
    files = store.list_files(PATH)
    with store.open_file(PATH, "weights.safetensors") as handle:
        assert len(handle.read()) == files["weights.safetensors"]
    with pytest.raises(NotFoundError):
        store.open_file(PATH, "../CURRENT")
    with pytest.raises(NotImplementedError):
        store.signed_urls(PATH)  # the memory filesystem cannot sign URLs
