"""`ServiceClient(base_url="local")` runs `tether serve` as a child process for the client's lifetime."""

from __future__ import annotations

from tests.client.conftest import MODEL
from tether.client import ServiceClient
from tether.types.data import Datum, ModelInput


def test_local_mode_starts_serves_and_stops(tmp_path, default_model_dir) -> None:
    client = ServiceClient(base_url="local", local_data_dir=tmp_path / "data")
    local = client._local
    assert local is not None and client.base_url.startswith("http://127.0.0.1:")
    try:
        tc = client.create_lora_training_client(MODEL, rank=2).result()
        datum = Datum(
            model_input=ModelInput.from_ints([104, 105]),
            loss_fn_inputs={"target_tokens": [105, 33], "weights": [1, 1]},
        )
        out = tc.forward([datum], "cross_entropy").result(timeout=60)
        assert out.loss_fn_outputs[0]["logprobs"].shape == [2]
        assert out.metrics["loss:sum"] > 0
    finally:
        client.close()
    assert local._process.poll() is not None  # the child is gone
    assert (tmp_path / "data").is_dir()  # its data stays where the caller asked
