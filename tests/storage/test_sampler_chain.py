"""Sampler checkpoint chains: base / delta / merged_base, exact rebuilds, restart-safe bookkeeping."""

from __future__ import annotations

import json

import pytest
import torch
import zstandard

from tether.storage import CorruptCheckpointError, LocalCheckpointStore, LoraLayout, StoredHfWeights
from tether.storage import sampler_chain as chain
from tether.storage.delta import DELTA_FILE, DeltaBaseMismatchError, compute_delta, write_delta
from tether.types.errors import UserInputError

RUN = "sess-1:train:0"


def _path(name: str, run: str = RUN) -> str:
    return f"tinker://{run}/sampler_weights/{name}"


@pytest.fixture
def base_dir(tmp_path):
    directory = tmp_path / "base-model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "toy", "tie_word_embeddings": True}))
    g = torch.Generator().manual_seed(0)
    from safetensors.torch import save_file

    save_file(
        {
            "model.embed_tokens.weight": torch.randn(16, 8, generator=g),
            "model.proj.weight": torch.randn(8, 8, generator=g),
        },
        str(directory / "model.safetensors"),
    )
    return directory


def _full(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(64, 32, generator=g) * 0.02
    return {
        "model.embed_tokens.weight": embed,
        "lm_head.weight": embed,
        "model.proj.weight": torch.randn(32, 32, generator=g) * 0.02,
        "model.norm.weight": torch.ones(32),
    }


def _adam_step(weights: dict[str, torch.Tensor], step: int, lr: float = 1e-4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    out, done = {}, {}
    for name, t in weights.items():
        if id(t) not in done:
            done[id(t)] = t + lr * torch.sign(torch.randn(t.shape, generator=g))
        out[name] = done[id(t)]
    return out


def _bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].contiguous().view(torch.uint8))
        for k in a
    )


def _hf(tensors, **kw) -> StoredHfWeights:
    return StoredHfWeights(base_model="toy", tensors=tensors, **kw)


def test_auto_chain_is_base_then_deltas_rebuilt_bit_exact(tmp_path, base_dir):
    store = LocalCheckpointStore(tmp_path / "store")
    weights = _full()
    saved = []
    for step in range(4):
        saved.append(
            chain.save_sampler_checkpoint_ext(store, _path(f"s{step}"), _hf(weights), base_model_dir=base_dir)
        )
        rebuilt = chain.load_sampler_checkpoint(store, _path(f"s{step}")).tensors
        assert _bits_equal(rebuilt, weights), step
        weights = _adam_step(weights, step)
    assert [s.checkpoint_type for s in saved] == ["base", "delta", "delta", "delta"]
    assert [s.link.index for s in saved] == [0, 1, 2, 3]
    assert {s.link.base_identity for s in saved} == {_path("s0")}
    assert [s.link.parent_identity for s in saved] == ["", _path("s0"), _path("s1"), _path("s2")]
    assert saved[1].stored_bytes < saved[0].stored_bytes
    delta_dir = store.directory(_path("s1"))
    assert (delta_dir / "config.json").is_file()  # same HF layout as a full snapshot, minus the weights


def test_chain_bookkeeping_survives_a_restart(tmp_path, base_dir):
    store = LocalCheckpointStore(tmp_path / "store")
    weights = _full()
    chain.save_sampler_checkpoint_ext(store, _path("a"), _hf(weights), base_model_dir=base_dir)
    chain.save_sampler_checkpoint_ext(store, _path("b"), _hf(_adam_step(weights, 0)), base_model_dir=base_dir)
    chain._cache.clear()  # a new process: nothing in memory
    reopened = LocalCheckpointStore(tmp_path / "store")
    head = chain.chain_head(reopened, RUN)
    assert head is not None and head.identity == _path("b") and head.index == 1
    later = _adam_step(_adam_step(weights, 0), 1)
    saved = chain.save_sampler_checkpoint_ext(reopened, _path("c"), _hf(later), base_model_dir=base_dir)
    assert saved.checkpoint_type == "delta" and saved.link.index == 2
    chain._cache.clear()
    assert _bits_equal(chain.load_sampler_checkpoint(reopened, _path("c")).tensors, later)
    # another run has its own chain
    other = chain.save_sampler_checkpoint_ext(
        reopened, _path("x", run="sess-2:train:0"), _hf(weights), base_model_dir=base_dir
    )
    assert other.checkpoint_type == "base"


def test_explicit_base_starts_a_new_chain(tmp_path, base_dir):
    store = LocalCheckpointStore(tmp_path / "store")
    w0 = _full()
    w1 = _adam_step(w0, 0)
    chain.save_sampler_checkpoint_ext(store, _path("a"), _hf(w0), base_model_dir=base_dir)
    chain.save_sampler_checkpoint_ext(
        store, _path("b"), _hf(w1), base_model_dir=base_dir, checkpoint_type="base"
    )
    saved = chain.save_sampler_checkpoint_ext(
        store, _path("c"), _hf(_adam_step(w1, 1)), base_model_dir=base_dir
    )
    assert saved.link.base_identity == _path("b") and saved.link.index == 1


def test_delta_on_the_wrong_base_or_damaged_fails_loudly(tmp_path, base_dir):
    store = LocalCheckpointStore(tmp_path / "store")
    w0 = _full()
    chain.save_sampler_checkpoint_ext(store, _path("a"), _hf(w0), base_model_dir=base_dir)
    chain.save_sampler_checkpoint_ext(store, _path("b"), _hf(_adam_step(w0, 0)), base_model_dir=base_dir)
    delta = chain.read_sampler_checkpoint_dir(store.directory(_path("b")))
    with pytest.raises(DeltaBaseMismatchError):
        delta.rebuild(_full(seed=1))
    data = store.directory(_path("b")) / DELTA_FILE
    data.write_bytes(data.read_bytes()[:-10])  # truncated
    with pytest.raises(CorruptCheckpointError):
        chain.read_sampler_checkpoint_dir(store.directory(_path("b")))


def test_bad_requests_are_user_errors(tmp_path, base_dir):
    store = LocalCheckpointStore(tmp_path / "store")
    with pytest.raises(UserInputError, match="no base"):
        chain.save_sampler_checkpoint_ext(
            store, _path("a"), _hf(_full()), checkpoint_type="delta", base_model_dir=base_dir
        )
    with pytest.raises(UserInputError, match="checkpoint_type"):
        chain.save_sampler_checkpoint_ext(
            store, _path("a"), _hf(_full()), checkpoint_type="full", base_model_dir=base_dir
        )
    with pytest.raises(UserInputError, match="LoRA"):
        chain.save_sampler_checkpoint_ext(
            store, _path("a"), _hf(_full()), checkpoint_type="merged_base", base_model_dir=base_dir
        )
    assert store.list() == []


def _adapter(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.proj.lora_A": torch.randn(2, 8, generator=g),
        "model.proj.lora_B": torch.randn(8, 2, generator=g),
        "lm_head.lora_A": torch.randn(2, 8, generator=g),
        "lm_head.lora_B": torch.randn(16, 2, generator=g),
    }


def test_merged_base_folds_the_lora_exactly_and_chains_deltas_on_merged_weights(tmp_path, base_dir):
    store = LocalCheckpointStore(tmp_path / "store")
    layout = LoraLayout(rank=2, alpha=8.0)
    adapter = _adapter()
    saved = chain.save_sampler_checkpoint_ext(
        store, _path("m"), _hf(adapter, lora=layout), checkpoint_type="merged_base", base_model_dir=base_dir
    )
    assert saved.checkpoint_type == "merged_base" and not saved.link.is_lora
    merged = chain.load_sampler_checkpoint(store, _path("m")).tensors
    base = chain.read_base_state_dict(base_dir)
    scale = 8.0 / 2
    expected_proj = (
        base["model.proj.weight"] + scale * adapter["model.proj.lora_B"] @ adapter["model.proj.lora_A"]
    )
    torch.testing.assert_close(merged["model.proj.weight"], expected_proj, rtol=0, atol=1e-6)
    expected_head = (
        base["model.embed_tokens.weight"] + scale * adapter["lm_head.lora_B"] @ adapter["lm_head.lora_A"]
    )
    torch.testing.assert_close(merged["lm_head.weight"], expected_head, rtol=0, atol=1e-6)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    # the next automatic save is a delta on merged weights
    moved = {k: v + 1e-3 for k, v in adapter.items()}
    delta = chain.save_sampler_checkpoint_ext(
        store, _path("d"), _hf(moved, lora=layout), base_model_dir=base_dir
    )
    assert delta.checkpoint_type == "delta" and not delta.link.is_lora
    expected = chain.merge_lora(base, moved, scale)
    assert _bits_equal(chain.load_sampler_checkpoint(store, _path("d")).tensors, expected)


def test_lora_adapters_chain_as_adapter_deltas(tmp_path):
    store = LocalCheckpointStore(tmp_path / "store")
    layout = LoraLayout(rank=2, alpha=8.0)
    a0 = _adapter()
    chain.save_sampler_checkpoint_ext(store, _path("a"), _hf(a0, lora=layout))
    a1 = {k: v + 1e-4 for k, v in a0.items()}
    saved = chain.save_sampler_checkpoint_ext(store, _path("b"), _hf(a1, lora=layout))
    assert saved.checkpoint_type == "delta" and saved.link.is_lora
    loaded = chain.load_sampler_checkpoint(store, _path("b"))
    assert loaded.lora is not None and loaded.lora.rank == 2
    assert _bits_equal(loaded.tensors, a1)


def test_byte_planes_beat_plain_xor_zstd(tmp_path):
    w0 = {k: v for k, v in _full().items() if k != "lm_head.weight"}
    w1 = _adam_step(w0, 0, lr=1e-5)
    delta = compute_delta(w0, w1)
    write_delta(tmp_path, delta, w0)
    ours = (tmp_path / DELTA_FILE).stat().st_size
    plain = sum(
        len(zstandard.ZstdCompressor(level=3).compress(x.numpy().tobytes())) for x in delta.xor.values()
    )
    assert ours < plain / 1.5
