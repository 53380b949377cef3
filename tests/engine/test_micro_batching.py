"""Micro-batch planning (plain Python) and that no autograd graph outlives its micro-batch."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from engine_reference import make_data

from tether.engine.lora import LoraSpec
from tether.engine.micro_batching import plan_micro_batches


@pytest.mark.parametrize(
    ("lengths", "budget"),
    [([5, 3, 8, 1, 8, 2], 16), ([4] * 10, 12), ([1], 1), ([7, 7, 7], 100), ([3, 30, 2], 10)],
)
def test_plan_covers_every_datum_once_within_budget(lengths, budget):
    plan = plan_micro_batches(lengths, budget)
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    for batch in plan:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= budget or len(batch) == 1  # only a lone over-long datum may exceed it


def test_plan_fills_micro_batches_and_groups_by_length():
    assert plan_micro_batches([4] * 10, 12) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert plan_micro_batches([2, 9, 3, 8], 18) == [[1, 3], [2, 0]]
    assert plan_micro_batches([30, 2], 10) == [[0], [1]]


def test_no_graph_survives_forward_backward(training_engine):
    engine = training_engine
    engine.max_tokens_per_micro_batch = 8
    engine.create_model("m", lora=LoraSpec(rank=2, seed=0))
    seen: list[weakref.ref] = []
    hook = engine.base.model.get_output_embeddings().register_forward_hook(
        lambda m, i, out: seen.append(weakref.ref(out))
    )
    try:
        result = engine.forward_backward(
            "m", make_data([4, 4, 4, 4], vocab=engine.base.vocab_size), "cross_entropy"
        )
    finally:
        hook.remove()
    gc.collect()
    assert len(seen) == 2  # one forward per micro-batch of two datums
    assert all(ref() is None for ref in seen)  # every micro-batch's logits (and graph) were freed
    assert all(not out["logprobs"].requires_grad for out in result.outputs)
    assert all(isinstance(out["logprobs"], torch.Tensor) for out in result.outputs)
