"""Recipes that resume keep the embedded server's checkpoints beside their logs; their CLIs come from their configs."""

import pytest

from tether.cli import build_parser
from tether.cli_args import build_config
from tether.recipes import clients, distill, dpo, grpo, rl, run_settings, sft
from tether.types.errors import ConfigurationError


def test_local_runs_keep_server_data_in_the_log_dir(monkeypatch, tmp_path):
    made = []
    monkeypatch.setattr(clients, "ServiceClient", lambda **kwargs: made.append(kwargs) or object())
    clients.connect("local", None, local_data_dir=tmp_path / "local-server")
    assert made == [{"base_url": "local", "api_key": None, "local_data_dir": tmp_path / "local-server"}]


class Connected(Exception):
    pass


def test_every_recipe_passes_a_directory_inside_log_dir(monkeypatch, tmp_path):
    data = tmp_path / "convs.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}\n'
    )
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        '{"prompt": [{"role": "user", "content": "1+1"}], "chosen": {"role": "assistant", "content": "2"},'
        ' "rejected": {"role": "assistant", "content": "3"}}\n'
    )
    seen = []

    def fake_connect(*args, **kwargs):
        seen.append(kwargs["local_data_dir"])
        raise Connected

    for module, config in (
        (sft, sft.Config(dataset_path=data, log_dir=tmp_path / "sft", base_url="local")),
        (grpo, grpo.Config(log_dir=tmp_path / "grpo", base_url="local")),
        (dpo, dpo.Config(dataset_path=pairs, log_dir=tmp_path / "dpo", base_url="local")),
        (rl, rl.Config(log_dir=tmp_path / "rl", base_url="local")),
        (distill, distill.Config(log_dir=tmp_path / "distill", base_url="local")),
    ):
        monkeypatch.setattr(run_settings, "connect", fake_connect)
        try:
            module.main(config)
        except Connected:
            pass
    assert seen == [tmp_path / name / "local-server" for name in ("sft", "grpo", "dpo", "rl", "distill")]


def _config(argv):
    args = build_parser().parse_args(argv)
    command = {"dpo": dpo, "rl": rl, "distill": distill}[args.command]
    return build_config(command.Config, args)


def test_the_new_recipes_cli_options_come_from_their_configs():
    config = _config(["rl", "--max-steps-off-policy", "1", "--stale-groups", "drop", "--loss-fn", "ppo"])
    assert (config.max_steps_off_policy, config.stale_groups, config.loss_fn) == (1, "drop", "ppo")
    assert _config(["dpo", "--beta", "0.5", "--dataset-path", "x.jsonl"]).beta == 0.5
    distilled = _config(["distill", "--teacher-model", "big/teacher", "--kl-coef", "0.5"])
    assert (distilled.teacher_model, distilled.kl_coef) == ("big/teacher", 0.5)
    with pytest.raises(ConfigurationError) as info:
        _config(["rl", "--max-steps-off-policy", "-1"])
    assert info.value.field == "max_steps_off_policy"
    with pytest.raises(SystemExit):
        _config(["rl", "--stale-groups", "later"])
