"""`TrainingClient.save_weights_for_sampler_ext` through the server: a base, then deltas that rebuild the
trainer's weights bit-exactly, recorded in the catalogue; bad checkpoint types are refused."""

from __future__ import annotations

import pytest
import torch

from tether.client import ServiceClient
from tether.server.config import ServerConfig
from tether.server.main import ServerThread
from tether.storage.sampler_chain import read_sampler_checkpoint_dir
from tether.types.data import AdamParams, Datum, ModelInput
from tether.types.errors import UserInputError
from tether.types.paths import parse_checkpoint_path

BASE = "tether/tiny-qwen3"


def _datum(text: str) -> Datum:
    tokens = list(text.encode())
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


@pytest.mark.parametrize("rank", [0, 4], ids=["full", "lora"])
def test_a_base_then_deltas_rebuild_the_trainers_weights_exactly(tmp_path, default_model_dir, rank):
    server = ServerThread(ServerConfig(port=0, data_dir=tmp_path, long_poll_s=5))
    with server as url:
        service = ServiceClient(base_url=url, api_key="tml-ext")
        client = service.create_lora_training_client(BASE, rank=rank, seed=0).result()
        state = server.app.state.tether
        engine = state.trainers.get(BASE).executor.training
        written = []
        for step in range(3):
            client.forward_backward([_datum(f"delta step {step}")], "cross_entropy")
            client.optim_step(AdamParams(learning_rate=1e-2))
            answer = client.save_weights_for_sampler_ext(f"s{step}").result()
            written.append(answer)
            expected = {k: v.clone() for k, v in engine.sampler_weights(client.model_id).tensors.items()}
            owner = state.auth.owner("tml-ext")
            directory = state.checkpoints.directory(owner, parse_checkpoint_path(answer.path))
            checkpoint = read_sampler_checkpoint_dir(directory)
            if step == 0:
                assert answer.checkpoint_type == "base" and checkpoint.weights is not None
                tensors = dict(checkpoint.weights.tensors)
            else:
                assert answer.checkpoint_type == "delta" and answer.stored_bytes < answer.full_bytes
                tensors = checkpoint.rebuild(tensors)
            assert tensors.keys() == expected.keys()
            for name, tensor in expected.items():
                assert torch.equal(tensors[name], tensor.to(tensors[name].dtype)), name
        listed = state.catalogue.list_checkpoints(owner, client.model_id)
        rows = listed[0] if isinstance(listed, tuple) else listed
        assert {row.tinker_path for row in rows} == {a.path for a in written}
        with pytest.raises(UserInputError):
            client.save_weights_for_sampler_ext("bad", checkpoint_type="sideways")  # type: ignore[arg-type]
        service.close()
