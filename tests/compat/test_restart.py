"""Save, stop the server, start it again on the same data directory, load and continue."""

from __future__ import annotations

import pytest

from tether.server.config import ServerConfig
from tether.server.main import ServerThread

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

KEY = "tml-restart"
BASE = "tether/tiny-qwen3"
IDS = list(b"restart me please")
BATCH = [
    types.Datum(
        model_input=types.ModelInput.from_ints(IDS[:-1]),
        loss_fn_inputs={"target_tokens": IDS[1:], "weights": [1.0] * (len(IDS) - 1)},
    )
]
ADAM = types.AdamParams(learning_rate=5e-3)


def _step(client) -> float:
    fwd = client.forward_backward(BATCH, "cross_entropy")
    client.optim_step(ADAM).result()
    return fwd.result().metrics["loss:sum"]


def test_checkpoints_survive_a_restart_and_training_continues(tmp_path, default_model_dir, trainer_mode):
    config = ServerConfig(
        port=0, data_dir=tmp_path, long_poll_s=5, trainer_process=trainer_mode == "trainer-process"
    )
    with ServerThread(config) as url:
        service = tinker.ServiceClient(base_url=url, api_key=KEY)
        client = service.create_lora_training_client(base_model=BASE, rank=4, seed=0).result()
        _step(client)
        _step(client)
        state_path = client.save_state("before-restart").result().path
        sampler_path = client.save_weights_for_sampler("sampler-before-restart").result().path
        prompt = types.ModelInput.from_ints(IDS)
        logprobs_before = (
            client.save_weights_and_get_sampling_client().result().compute_logprobs(prompt).result()
        )
        _step(client)
        expected_next = client.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]
        run_id = client.model_id
        service.close("success")

    with ServerThread(config) as url:
        rest = tinker.RestClient(base_url=url, api_key=KEY)
        listed = {c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints}
        assert {state_path, sampler_path} <= listed
        assert rest.get_training_run(run_id).result().base_model == BASE

        service = tinker.ServiceClient(base_url=url, api_key=KEY)
        resumed = service.create_training_client_from_state_with_optimizer(state_path).result()
        _step(resumed)
        assert resumed.forward(BATCH, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(
            expected_next, rel=1e-4
        )
        sampler = service.create_sampling_client(model_path=sampler_path).result()
        assert sampler.compute_logprobs(prompt).result() == pytest.approx(logprobs_before, abs=1e-5)
        service.close("success")
