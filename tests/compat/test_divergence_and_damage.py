"""The official SDK against divergence and damaged checkpoints: clear errors at once, never a hang.

A loss weighted by 1e38 makes the gradients non-finite: the optimizer step is refused with a user
error (the model is unchanged and keeps training); a learning rate of 1e30 is refused at submit.
An edited checkpoint manifest fails to load with an error naming the damage, without the SDK's
minute of retries.
"""

from __future__ import annotations

import json
import math

import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from tether.server.auth import SINGLE_USER_OWNER  # noqa: E402
from tether.storage.manifest import MANIFEST_NAME  # noqa: E402
from tether.types.paths import parse_checkpoint_path  # noqa: E402

BASE = "tether/tiny-qwen3"
IDS = list(b"divergence")


def _batch(weight: float) -> list[types.Datum]:
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(IDS[:-1]),
            loss_fn_inputs={"target_tokens": IDS[1:], "weights": [weight] * (len(IDS) - 1)},
        )
    ]


def test_a_diverged_step_is_refused_and_the_model_keeps_training(service_client):
    client = service_client.create_lora_training_client(base_model=BASE, rank=2, seed=0).result()
    prompt = types.ModelInput.from_ints(IDS)
    before = client.save_weights_and_get_sampling_client().result().compute_logprobs(prompt).result()
    fwd = client.forward_backward(_batch(1e38), "cross_entropy").result()
    assert not math.isfinite(fwd.metrics["loss:sum"])  # reported, not hidden
    with pytest.raises(tinker.RequestFailedError, match="not finite") as caught:
        client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert caught.value.category == types.RequestErrorCategory.User
    after = client.save_weights_and_get_sampling_client().result().compute_logprobs(prompt).result()
    assert after == pytest.approx(before, abs=0)  # weights unchanged
    with pytest.raises((tinker.BadRequestError, tinker.UnprocessableEntityError), match="learning_rate"):
        client.optim_step(types.AdamParams(learning_rate=1e30)).result()
    client.forward_backward(_batch(1.0), "cross_entropy").result()
    assert all(
        math.isfinite(v)
        for v in client.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics.values()
    )


def test_an_edited_manifest_fails_fast_naming_the_damage(server, service_client):
    client = service_client.create_lora_training_client(base_model=BASE, rank=2, seed=0).result()
    path = client.save_weights_for_sampler("to-be-edited").result().path
    directory = server.app.state.tether.checkpoints.directory(SINGLE_USER_OWNER, parse_checkpoint_path(path))
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["metadata"]["tether_lora_spec"]["alpha"] *= 100
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="manifest.json does not match its digest") as caught:
        service_client.create_sampling_client(model_path=path).result(timeout=60)
    assert str(directory) not in str(caught.value)
