"""Recipes that resume keep the embedded server's checkpoints beside their logs."""

from tether.recipes import clients, grpo, run_settings, sft


def test_local_runs_keep_server_data_in_the_log_dir(monkeypatch, tmp_path):
    made = []
    monkeypatch.setattr(clients, "ServiceClient", lambda **kwargs: made.append(kwargs) or object())
    clients.connect("local", None, local_data_dir=tmp_path / "local-server")
    assert made == [{"base_url": "local", "api_key": None, "local_data_dir": tmp_path / "local-server"}]


class Connected(Exception):
    pass


def test_sft_and_grpo_pass_a_directory_inside_log_dir(monkeypatch, tmp_path):
    data = tmp_path / "convs.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}\n')
    seen = []

    def fake_connect(*args, **kwargs):
        seen.append(kwargs["local_data_dir"])
        raise Connected

    for module, config in (
        (sft, sft.Config(dataset_path=data, log_dir=tmp_path / "sft", base_url="local")),
        (grpo, grpo.Config(log_dir=tmp_path / "grpo", base_url="local")),
    ):
        monkeypatch.setattr(run_settings, "connect", fake_connect)
        try:
            module.main(config)
        except Connected:
            pass
    assert seen == [tmp_path / "sft" / "local-server", tmp_path / "grpo" / "local-server"]
