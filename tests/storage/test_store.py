"""LocalCheckpointStore: round trips, checksums, kinds, listing, and crash safety."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tether.storage import (
    CorruptCheckpointError,
    LocalCheckpointStore,
    LoraLayout,
    StoredHfWeights,
    StoredTrainingState,
    formats,
)
from tether.types.errors import ConflictError, NotFoundError, UserInputError

RUN = "sess-1:train:0"
TRAIN_PATH = f"tinker://{RUN}/weights/step_1"


def _state(seed: int = 0, *, optimizer: bool = True) -> StoredTrainingState:
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(8, 4, generator=g)
    weights = {"embed.weight": embed, "lm_head.weight": embed, "layer.lora_A": torch.randn(2, 4, generator=g)}
    moments = {"exp_avg.layer.lora_A": torch.randn(2, 4, generator=g), "step.layer.lora_A": torch.tensor(3.0)}
    return StoredTrainingState(
        weights=weights, optimizer=moments if optimizer else None, metadata={"base_model": "m", "steps": seed}
    )


def _visible_entries(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir())


def test_training_state_round_trip_keeps_ties_and_metadata(tmp_path):
    store = LocalCheckpointStore(tmp_path)
    state = _state()
    info = store.save_training_state(TRAIN_PATH, state)
    assert info.tinker_path == TRAIN_PATH and info.format == "training_state"
    on_disk = sum(f.stat().st_size for f in store.directory(TRAIN_PATH).rglob("*") if f.is_file())
    assert info.size_bytes == on_disk == store.size_bytes(TRAIN_PATH)

    loaded = store.load_training_state(TRAIN_PATH, include_optimizer=True)
    assert loaded.metadata == {"base_model": "m", "steps": 0}
    for name, tensor in state.weights.items():
        torch.testing.assert_close(loaded.weights[name], tensor, rtol=0, atol=0)
    assert loaded.weights["lm_head.weight"] is loaded.weights["embed.weight"]
    torch.testing.assert_close(loaded.optimizer["step.layer.lora_A"], torch.tensor(3.0))
    assert store.load_training_state(TRAIN_PATH).optimizer is None


def test_optimizer_requested_but_not_saved_is_a_user_error(tmp_path):
    store = LocalCheckpointStore(tmp_path)
    store.save_training_state(TRAIN_PATH, _state(optimizer=False))
    with pytest.raises(UserInputError) as err:
        store.load_training_state(TRAIN_PATH, include_optimizer=True)
    assert err.value.field == "optimizer"


def test_conflict_overwrite_delete_list(tmp_path):
    store = LocalCheckpointStore(tmp_path)
    store.save_training_state(TRAIN_PATH, _state(0))
    with pytest.raises(ConflictError):
        store.save_training_state(TRAIN_PATH, _state(1))
    assert store.load_training_state(TRAIN_PATH).metadata["steps"] == 0
    store.save_training_state(TRAIN_PATH, _state(1), overwrite=True)
    assert store.load_training_state(TRAIN_PATH).metadata["steps"] == 1

    other = "tinker://sess-2:train:5/weights/a"
    store.save_training_state(other, _state(2))
    assert [i.tinker_path for i in store.list()] == [TRAIN_PATH, other]
    assert [i.tinker_path for i in store.list("sess-2:train:5")] == [other]
    assert store.exists(other)
    store.delete(other)
    assert not store.exists(other) and store.list("sess-2:train:5") == []
    with pytest.raises(NotFoundError):
        store.delete(other)
    with pytest.raises(NotFoundError):
        store.load_training_state(other)
    assert not any(".del-" in p or ".tmp-" in p for p in _visible_entries(tmp_path))


def test_checksum_mismatch_is_reported_with_the_file(tmp_path):
    store = LocalCheckpointStore(tmp_path)
    store.save_training_state(TRAIN_PATH, _state())
    weights_file = store.directory(TRAIN_PATH) / "weights.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-1] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="weights.safetensors"):
        store.load_training_state(TRAIN_PATH)


def test_kinds_are_enforced(tmp_path):
    store = LocalCheckpointStore(tmp_path)
    with pytest.raises(UserInputError) as err:
        store.save_training_state(f"tinker://{RUN}/sampler_weights/x", _state())
    assert err.value.field == "path"
    store.save_training_state(TRAIN_PATH, _state())
    with pytest.raises(UserInputError):
        store.load_hf_weights(TRAIN_PATH)
    with pytest.raises(UserInputError):
        store.load_training_state("tinker://bad/../weights/x")


def test_failure_mid_write_leaves_old_checkpoint_and_nothing_else(tmp_path, monkeypatch):
    store = LocalCheckpointStore(tmp_path)
    store.save_training_state(TRAIN_PATH, _state(0))
    before = _visible_entries(tmp_path)
    real_save = formats.save_file
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        real_save(tensors, filename, metadata=metadata)
        if len(calls) % 2 == 0:  # the optimizer file, after the weights file
            raise OSError("disk full")

    monkeypatch.setattr(formats, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        store.save_training_state(TRAIN_PATH, _state(1), overwrite=True)
    with pytest.raises(OSError):
        store.save_training_state(f"tinker://{RUN}/weights/new", _state(1))
    assert _visible_entries(tmp_path) == before
    assert store.load_training_state(TRAIN_PATH, include_optimizer=True).metadata["steps"] == 0
    assert [i.tinker_path for i in store.list()] == [TRAIN_PATH]


def test_hard_crash_mid_write_is_invisible_and_cleaned_on_reopen(tmp_path):
    store = LocalCheckpointStore(tmp_path)
    store.save_training_state(TRAIN_PATH, _state(0))
    script = textwrap.dedent(
        f"""
        import os, torch
        from tether.storage import LocalCheckpointStore, StoredTrainingState, formats
        real = formats.save_file
        def dying(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            os._exit(3)  # killed after writing one file: no cleanup runs
        formats.save_file = dying
        store = LocalCheckpointStore({str(tmp_path)!r})
        state = StoredTrainingState(weights={{"w": torch.ones(3)}}, metadata={{"steps": 9}})
        store.save_training_state({TRAIN_PATH!r}, state, overwrite=True)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == 3, result.stderr.decode()
    segment_dir = store.directory(TRAIN_PATH).parent
    assert any(".tmp-" in name for name in os.listdir(segment_dir))  # the crash left its staging dir
    assert [i.tinker_path for i in store.list()] == [TRAIN_PATH]
    assert store.load_training_state(TRAIN_PATH).metadata["steps"] == 0
    LocalCheckpointStore(tmp_path)  # young work dirs may be another process's save in progress: kept
    assert any(".tmp-" in name for name in os.listdir(segment_dir))
    LocalCheckpointStore(tmp_path, stale_after_s=0)  # once stale, reopening cleans up
    assert sorted(os.listdir(segment_dir)) == ["step_1"]


def test_crash_between_retiring_old_and_renaming_new_restores_old(tmp_path):
    store = LocalCheckpointStore(tmp_path)
    store.save_training_state(TRAIN_PATH, _state(0))
    final = store.directory(TRAIN_PATH)
    os.replace(final, final.parent / ".step_1.old-abc")  # the commit died right after this rename
    assert not store.exists(TRAIN_PATH)
    reopened = LocalCheckpointStore(tmp_path, stale_after_s=0)
    assert reopened.load_training_state(TRAIN_PATH).metadata["steps"] == 0


def test_lora_hf_weights_use_peft_layout(tmp_path):
    import json

    from safetensors.torch import load_file

    store = LocalCheckpointStore(tmp_path)
    tensors = {
        "model.layers.0.self_attn.q_proj.lora_A": torch.randn(2, 8),
        "model.layers.0.self_attn.q_proj.lora_B": torch.randn(6, 2),
        "lm_head.lora_A": torch.randn(2, 8),
        "lm_head.lora_B": torch.randn(10, 2),
    }
    path = f"tinker://{RUN}/sampler_weights/s1"
    weights = StoredHfWeights(
        base_model="tether/tiny-qwen3",
        tensors=tensors,
        lora=LoraLayout(rank=2, alpha=16.0),
        metadata={"seed": 1},
    )
    info = store.save_hf_weights(path, weights)
    assert info.is_lora and info.format == "hf_weights"
    directory = store.directory(path)
    raw = load_file(str(directory / "adapter_model.safetensors"))
    assert sorted(raw) == sorted(
        [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            "base_model.model.lm_head.lora_A.weight",
            "base_model.model.lm_head.lora_B.weight",
        ]
    )
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 16.0
    assert (
        config["target_modules"] == ["lm_head", "q_proj"]
        and config["base_model_name_or_path"] == "tether/tiny-qwen3"
    )
    loaded = store.load_hf_weights(path)
    assert loaded.lora == LoraLayout(rank=2, alpha=16.0, target_modules=["lm_head", "q_proj"])
    assert loaded.metadata == {"seed": 1}
    for name, tensor in tensors.items():
        torch.testing.assert_close(loaded.tensors[name], tensor, rtol=0, atol=0)
    with pytest.raises(ValueError):
        store.save_hf_weights(
            f"tinker://{RUN}/sampler_weights/bad",
            StoredHfWeights("m", {"x.weight": torch.ones(1)}, LoraLayout(1, 1.0)),
        )
    assert not store.exists(f"tinker://{RUN}/sampler_weights/bad")


def test_full_hf_weights_load_with_from_pretrained(tmp_path, default_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in base.parameters():
            param.add_(0.01 * torch.randn_like(param))
    store = LocalCheckpointStore(tmp_path)
    path = f"tinker://{RUN}/external_weights/full"
    store.save_hf_weights(
        path,
        StoredHfWeights(base_model="tether/tiny-qwen3", tensors=base.state_dict()),
        base_model_dir=default_model_dir,
        tokenizer_dir=default_model_dir,
    )
    directory = store.directory(path)
    assert (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()
    assert any(name.startswith("tokenizer") for name in os.listdir(directory))
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, base(tokens).logits)
    state = store.load_hf_weights(path).tensors
    assert state.keys() == base.state_dict().keys()
    with pytest.raises(ValueError):
        store.save_hf_weights(
            f"tinker://{RUN}/sampler_weights/nobase", StoredHfWeights("m", {"w": torch.ones(1)})
        )


def test_work_dirs_carry_their_creation_time(tmp_path):
    import time

    from tether.storage import atomic

    old = atomic._work_dir(tmp_path, "ckpt", ".old-")
    assert old.name.startswith(".ckpt.old-") and atomic.is_hidden_work_dir(old.name)
    assert 0 <= atomic._age_s(old, time.time()) < 60
    os.utime(old, (0, 0))  # a renamed directory keeps its old mtime: the name still says it is young
    assert atomic._age_s(old, time.time()) < 60


def test_files_can_be_listed_and_streamed_but_never_outside_the_manifest(tmp_path):
    store = LocalCheckpointStore(tmp_path)
    store.save_training_state(TRAIN_PATH, _state())
    files = store.list_files(TRAIN_PATH)
    assert sorted(files) == ["optimizer.safetensors", "weights.safetensors"]
    with store.open_file(TRAIN_PATH, "weights.safetensors") as handle:
        assert len(handle.read()) == files["weights.safetensors"]
    for bad in ["manifest.json", "../../../etc/passwd", "missing.bin"]:
        with pytest.raises(NotFoundError):
            store.open_file(TRAIN_PATH, bad)
