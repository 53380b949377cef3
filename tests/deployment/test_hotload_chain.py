"""Hot-loading a chain (base + 4 deltas, then a re-base): the deployment serves the trainer's weights.

After every hot-load the deployment's prompt logprobs of a fixed sequence equal the trainer
engine's forward logprobs (CPU fp32, 1e-4), for full fine-tuning, LoRA adapters and a merged LoRA.
"""

from __future__ import annotations

import pytest
import torch

from tether.deployment.backend import EngineBackend
from tether.deployment.served import ServedWeights
from tether.engine.lora import LoraSpec
from tether.engine.model_loading import load_base_model
from tether.engine.sampling import SampleRequest
from tether.engine.training_engine import TrainingEngine
from tether.engine.training_types import AdamWParams, EngineDatum
from tether.storage import LocalCheckpointStore, LoraLayout, StoredHfWeights
from tether.storage.sampler_chain import save_sampler_checkpoint_ext

SEQUENCE = [5, 17, 101, 33, 64, 200, 12, 9, 77, 150, 3, 41]
RUN = "sess-1:train:0"


def trainer_logprobs(trainer: TrainingEngine, model_id: str) -> torch.Tensor:
    datum = EngineDatum(
        torch.tensor(SEQUENCE[:-1]),
        {"target_tokens": torch.tensor(SEQUENCE[1:]), "weights": torch.ones(len(SEQUENCE) - 1)},
    )
    return trainer.forward(model_id, [datum], "cross_entropy").outputs[0]["logprobs"]


def deployment_logprobs(served: ServedWeights) -> torch.Tensor:
    future, _ = served.submit(
        SampleRequest(prompt_tokens=SEQUENCE, max_tokens=1, include_prompt_logprobs=True)
    )
    return torch.tensor(future.result(timeout=60).prompt_logprobs[1:])


def train_step(trainer: TrainingEngine, model_id: str, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 200, (17,), generator=g)
    trainer.forward_backward(
        model_id,
        [EngineDatum(tokens[:-1], {"target_tokens": tokens[1:], "weights": torch.ones(16)})],
        "cross_entropy",
    )
    trainer.optim_step(model_id, AdamWParams(learning_rate=1e-2))


@pytest.fixture
def served(model_dir, tmp_path):
    backend = EngineBackend(load_base_model(str(model_dir)))
    served = ServedWeights(backend, base_model=str(model_dir), state_dir=tmp_path / "state")
    yield served
    backend.close()


@pytest.mark.parametrize("mode", ["full", "lora", "merged"])
def test_every_hotload_of_a_chain_serves_the_trainers_weights(mode, model_dir, served, tmp_path):
    trainer = TrainingEngine(load_base_model(str(model_dir)))
    spec = None if mode == "full" else LoraSpec(rank=4, alpha=8.0, seed=1)
    trainer.create_model("m", lora=spec)
    store = LocalCheckpointStore(tmp_path / "store")
    types, previous = [], deployment_logprobs(served)
    for step in range(6):
        if step:
            train_step(trainer, "m", step)
        weights = trainer.sampler_weights("m")
        layout = LoraLayout(rank=spec.rank, alpha=spec.alpha) if spec else None
        kind = "base" if step == 5 else ("merged_base" if mode == "merged" and step == 0 else None)
        saved = save_sampler_checkpoint_ext(
            store,
            f"tinker://{RUN}/sampler_weights/step-{step}",
            StoredHfWeights(base_model=str(model_dir), tensors=weights.tensors, lora=layout),
            checkpoint_type=kind if not (mode == "merged" and step == 5) else "merged_base",
            base_model_dir=model_dir,
            tokenizer_dir=model_dir,
        )
        types.append(saved.checkpoint_type)
        served.hotload(str(store.directory(saved.info.path)))
        assert served.current.identity == saved.link.identity
        served_lp = deployment_logprobs(served)
        torch.testing.assert_close(served_lp, trainer_logprobs(trainer, "m"), rtol=0, atol=1e-4)
        if step:
            assert (served_lp - previous).abs().max() > 1e-3  # the weights really changed
        previous = served_lp
    first = "merged_base" if mode == "merged" else "base"
    assert types == [first, "delta", "delta", "delta", "delta", first]
