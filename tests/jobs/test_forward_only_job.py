"""A forward-only (frozen reference) trainer job through the SDK: its logprobs are the base model's
(plain transformers reference), for a LoRA client (adapter disabled) and a full one; it refuses
forward_backward, optim_step and save_state with a 400 naming why."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tether.client.jobs import TrainerJobConfig, TrainerJobManager
from tether.client.service_client import ServiceClient
from tether.types.data import AdamParams
from tether.types.errors import UserInputError

from .conftest import ALICE, BASE, batch


def base_logprobs(model_dir, step: int) -> np.ndarray:
    """Reference: the plain Hugging Face model's log-softmax at the batch's targets."""
    datum = batch(step)[0]
    tokens = torch.tensor(datum.model_input.to_ints())
    targets = torch.from_numpy(np.asarray(datum.loss_fn_inputs["target_tokens"].to_numpy()))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens[None]).logits[0]
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0].numpy()


def test_forward_only_job_serves_base_logprobs_and_refuses_training(control_plane, default_model_dir):
    url, _ = control_plane
    manager = TrainerJobManager(url, ALICE)
    config = TrainerJobConfig(base_model=BASE, lora_rank=4, forward_only=True, requested_job_id="ref-1")
    endpoint = manager.create_and_wait(config, poll_interval_s=0.2, timeout_s=180)
    assert manager.get("ref-1").config.forward_only
    service = ServiceClient(base_url=endpoint.base_url, api_key=ALICE)
    try:
        expected = base_logprobs(default_model_dir, 7)
        for rank in (4, 0):  # a LoRA reference (adapter disabled) and a full one
            reference = service.create_lora_training_client(BASE, rank=rank, seed=0).result()
            out = reference.forward(batch(7), "cross_entropy").result()
            got = out.loss_fn_outputs[0]["logprobs"].to_numpy()
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

            refused = {
                "forward_backward": lambda r=reference: r.forward_backward(
                    batch(7), "cross_entropy"
                ).result(),
                "optim_step": lambda r=reference: r.optim_step(AdamParams(learning_rate=1e-3)).result(),
                "save_state": lambda r=reference: r.save_state("ref").result(),
            }
            for name, call in refused.items():
                with pytest.raises(UserInputError, match=f"{name} is refused.*forward-only") as info:
                    call()
                assert info.value.http_status == 400
        sampler = service.create_sampling_client(base_model=BASE)  # sampling is served too
        got = sampler.compute_logprobs(batch(7)[0].model_input).result()  # None first, then lp(t_i | t_<i)
        np.testing.assert_allclose(np.asarray(got[1:], np.float64), expected[:-1], rtol=1e-4, atol=1e-4)
        assert manager.list_checkpoints("ref-1") == []  # nothing was written
    finally:
        service.close()
        manager.delete("ref-1")
