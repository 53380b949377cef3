"""Checkpoints of a small trained chain, and a backend whose answers wait for the test's go-ahead."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

import torch

from tether.engine.model_loading import load_base_model
from tether.engine.training_engine import TrainingEngine
from tether.engine.training_types import AdamWParams, EngineDatum
from tether.storage import LocalCheckpointStore, StoredHfWeights
from tether.storage.sampler_chain import save_sampler_checkpoint_ext


def make_chain(
    model_dir: Path,
    root: Path,
    *,
    run: str = "sess-1:train:0",
    steps: int = 2,
    seed: int = 0,
    trained_base: bool = False,
) -> list[Path]:
    """Full fine-tuning checkpoints: a base, then `steps` deltas; returns their directories.

    `trained_base`: the base is taken after one step, so it differs from the base model.
    """
    trainer = TrainingEngine(load_base_model(str(model_dir)))
    trainer.create_model("m", lora=None)
    store = LocalCheckpointStore(root)
    paths = []
    for step in range(steps + 1):
        if step or trained_base:
            g = torch.Generator().manual_seed(seed * 100 + step)
            tokens = torch.randint(0, 200, (17,), generator=g)
            trainer.forward_backward(
                "m",
                [EngineDatum(tokens[:-1], {"target_tokens": tokens[1:], "weights": torch.ones(16)})],
                "cross_entropy",
            )
            trainer.optim_step("m", AdamWParams(learning_rate=1e-2))
        saved = save_sampler_checkpoint_ext(
            store,
            f"tinker://{run}/sampler_weights/step-{step}",
            StoredHfWeights(base_model=str(model_dir), tensors=trainer.sampler_weights("m").tensors),
            base_model_dir=model_dir,
            tokenizer_dir=model_dir,
        )
        paths.append(store.directory(saved.info.path))
    return paths


class GatedBackend:
    """Wraps a backend: answers are held until `gate` is set (requests stay in flight)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.base = inner.base
        self.gate = threading.Event()
        self.gate.set()

    def load(self, *args) -> None:
        self.inner.load(*args)

    def unload(self, version: str) -> None:
        self.inner.unload(version)

    def submit(self, request, version, on_token=None) -> Future:
        inner = self.inner.submit(request, version, on_token)
        outer: Future = Future()

        def relay() -> None:
            self.gate.wait()
            try:
                outer.set_result(inner.result())
            except Exception as exc:  # pragma: no cover - relayed to the test
                outer.set_exception(exc)

        threading.Thread(target=relay, daemon=True).start()
        return outer

    def close(self) -> None:
        self.inner.close()
