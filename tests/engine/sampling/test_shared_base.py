"""The engine shares its base module with a trainer thread without either seeing the other's adapters."""

from __future__ import annotations

import threading

import torch

import tether.engine.sampling as sampling
from tether.engine.lora import LoraSpec, adapter_routing, adapter_tensors, add_adapter, remove_adapter
from tether.engine.sampling import SampleRequest


def test_public_surface_is_pinned():
    assert sorted(sampling.__all__) == [
        "SampleRequest",
        "SampleResult",
        "SampledSequence",
        "SamplingEngine",
        "SchedulerConfig",
    ]


def test_sampling_is_unaffected_by_a_trainer_running_another_adapter_concurrently(engine, base):
    prompts = [list(b"shared base"), list(b"xyz"), list(b"a longer prompt here")]

    def run_all():
        futures = [engine.submit(SampleRequest(p, max_tokens=20, temperature=0.0, stop=[])) for p in prompts]
        return [f.result(timeout=60).sequences[0].tokens for f in futures]

    quiet = run_all()
    add_adapter(base.model, "trainer", LoraSpec(rank=4, seed=0))
    with torch.no_grad():
        for name, tensor in adapter_tensors(base.model, "trainer").items():
            if name.endswith("lora_B"):
                tensor.normal_(0, 0.5)
    stop = threading.Event()
    trainer_outputs = []

    def trainer():
        ids = torch.tensor([list(b"training batch")])
        with adapter_routing("trainer"), torch.no_grad():
            while not stop.is_set():
                trainer_outputs.append(base.model(input_ids=ids).logits[0, -1, :3].clone())

    thread = threading.Thread(target=trainer)
    thread.start()
    try:
        busy = run_all()
    finally:
        stop.set()
        thread.join()
        remove_adapter(base.model, "trainer")
    assert busy == quiet
    assert trainer_outputs
    with torch.no_grad():
        plain = base.model(input_ids=torch.tensor([list(b"training batch")])).logits[0, -1, :3]
    assert not torch.allclose(trainer_outputs[0], plain)  # the trainer really ran its adapter
    assert all(torch.equal(o, trainer_outputs[0]) for o in trainer_outputs)
