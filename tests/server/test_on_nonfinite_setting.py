"""`tether serve --on-nonfinite skip|refuse`: what an optimizer step that would diverge does, per server.

"refuse" (the default) fails the step with a user error (tests/compat/test_divergence_and_damage.py);
"skip" answers it with `skipped_nonfinite:sum` = 1, drops the unusable gradients and trains on. The
setting reaches the trainer in the server's process and in a `tether trainer` process alike.
"""

from __future__ import annotations

import math

import pytest

from tether.cli import build_parser
from tether.cli_args import build_config
from tether.server.config import ServerConfig
from tether.types.errors import ConfigurationError

BASE = "tether/tiny-qwen3"
IDS = list(b"divergence")


def _serve_config(argv: list[str]) -> ServerConfig:
    args = build_parser().parse_args(["serve", *argv])
    return build_config(ServerConfig, args, env_prefix="TETHER_", environ={})  # type: ignore[return-value]


def test_the_flag_sets_the_engine_setting():
    assert _serve_config([]).on_nonfinite == "refuse"
    config = _serve_config(["--on-nonfinite", "skip"])
    assert config.on_nonfinite == "skip" and config.engine_settings().on_nonfinite == "skip"
    with pytest.raises(SystemExit):
        _serve_config(["--on-nonfinite", "ignore"])
    with pytest.raises(ConfigurationError, match="on_nonfinite"):
        build_config(
            ServerConfig,
            build_parser().parse_args(["serve"]),
            env_prefix="TETHER_",
            environ={"TETHER_ON_NONFINITE": "ignore"},
        )


@pytest.mark.parametrize("trainer_process", [False, True], ids=["in-process", "trainer-process"])
def test_a_skipping_server_skips_a_diverged_step_and_trains_on(tmp_path, default_model_dir, trainer_process):
    from tether.client import ServiceClient
    from tether.server.main import ServerThread
    from tether.types.data import AdamParams, Datum, ModelInput

    def batch(weight: float) -> list[Datum]:
        return [
            Datum(
                model_input=ModelInput.from_ints(IDS[:-1]),
                loss_fn_inputs={"target_tokens": IDS[1:], "weights": [weight] * (len(IDS) - 1)},
            )
        ]

    config = ServerConfig(
        port=0, data_dir=tmp_path, long_poll_s=5, on_nonfinite="skip", trainer_process=trainer_process
    )
    with ServerThread(config) as url:
        service = ServiceClient(base_url=url, api_key="tml-test")
        try:
            client = service.create_lora_training_client(BASE, rank=2, seed=0).result()
            probe = client.forward(batch(1.0), "cross_entropy").result().metrics["loss:sum"]
            client.forward_backward(batch(1e38), "cross_entropy").result()
            skipped = client.optim_step(AdamParams(learning_rate=1e-3)).result().metrics
            assert skipped["skipped_nonfinite:sum"] == 1.0
            assert client.forward(batch(1.0), "cross_entropy").result().metrics["loss:sum"] == probe
            client.forward_backward(batch(1.0), "cross_entropy").result()
            step = client.optim_step(AdamParams(learning_rate=1e-2)).result().metrics
            assert "skipped_nonfinite:sum" not in step and math.isfinite(step["grad_norm:mean"])
            assert client.forward(batch(1.0), "cross_entropy").result().metrics["loss:sum"] < probe
        finally:
            service.close()
