"""SFT, GRPO and the quickstart end to end against a real local tether server with the default model."""

from __future__ import annotations

import json
import random

import pytest

from tether.recipes import grpo, quickstart, sft
from tether.recipes.addition import Problem
from tether.recipes.problems import DatasetProblems


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _server_series(service, training_client) -> dict:
    """The run's metric series as the server recorded them (what the console draws)."""
    import httpx

    answer = httpx.get(
        f"{service.base_url}/api/v1/tether/runs/{training_client.model_id}/metrics",
        headers={"X-API-Key": "tml-local"},
        timeout=30,
    )
    answer.raise_for_status()
    return answer.json()["series"]


def test_sft_trains_evaluates_checkpoints_and_resumes_through_the_server(tmp_path, local_service):
    data = tmp_path / "data.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": str(2 * i)}]}
        for i in range(40)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = sft.Config(
        dataset_path=data,
        test_size=8,
        log_dir=tmp_path / "run",
        lora_rank=8,
        learning_rate=1e-2,
        lr_schedule="constant",
        batch_size=8,
        num_epochs=2,
        eval_every=3,
        save_every=3,
        progress=False,
    )
    train, held_out = sft.split_conversations(config, sft.load_conversations(data))
    first = sft.train_sft(config.model_copy(update={"max_steps": 4}), local_service, train, held_out)
    assert first.steps_run == 4
    resumed = sft.train_sft(config, local_service, train, held_out)
    assert resumed.steps_run == 4  # 32 // 8 = 4 batches per epoch, 2 epochs; resumed at step 4
    rows = _read(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(8))
    assert [r["next_step"] for r in _read(tmp_path / "run" / "checkpoints.jsonl")] == [3, 4, 6, 8]
    assert rows[-1]["train_mean_nll"] < rows[0]["train_mean_nll"]
    nll = [r["test/nll"] for r in rows if "test/nll" in r]
    assert len(nll) == 3 and nll[-1] < nll[0]
    logged = _server_series(local_service, resumed.training_client)["client/train_mean_nll"]
    assert [s for s, _ in logged] == [r["step"] for r in rows[4:]]
    assert [v for _, v in logged] == pytest.approx([r["train_mean_nll"] for r in rows[4:]])


def test_grpo_improves_reward_on_a_toy_task_with_a_fixed_seed(tmp_path, local_service):
    """After a short SFT on answers "a" and "b" alike, GRPO rewarding "a" makes "a" more likely."""
    prompts = [[{"role": "user", "content": f"pick {i}"}] for i in range(16)]
    rng = random.Random(0)
    conversations = [
        [*p, {"role": "assistant", "content": rng.choice("ab")}] for p in prompts for _ in range(4)
    ]
    warmup = sft.Config(
        log_dir=tmp_path / "sft", lora_rank=0, learning_rate=3e-3, lr_schedule="constant", batch_size=16,
        eval_every=None, save_every=None, progress=False,
    )  # fmt: skip
    start = sft.train_sft(warmup, local_service, conversations)
    source = DatasetProblems([Problem(messages=p, answer="a") for p in prompts], test_size=0, seed=0)
    config = grpo.Config(
        log_dir=tmp_path / "grpo", lora_rank=0, learning_rate=3e-4, batch_size=4, group_size=8, num_steps=8,
        max_tokens=3, eval_every=None, save_every=4, progress=False, seed=0,
    )  # fmt: skip
    result = grpo.train_grpo(config, local_service, source, training_client=start.training_client)
    rewards = [r["reward/mean"] for r in result.metrics]
    assert len(rewards) == 8
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.1, rewards
    for row in result.metrics:
        assert abs(row["kl_sample_train_v1"]) < 1e-3, "sampler and trainer agree on the same weights"
    assert [r["next_step"] for r in _read(tmp_path / "grpo" / "checkpoints.jsonl")] == [4, 8]
    series = _server_series(local_service, result.training_client)
    assert [s for s, _ in series["client/reward/mean"]] == list(range(8))
    assert [s for s, _ in series["client/kl_sample_train_v1"]] == list(range(8))


def test_quickstart_writes_metrics_and_plot(tmp_path, local_service):
    config = quickstart.Config(
        log_dir=tmp_path / "qs", heldout_problems=10, sft_steps=3, sft_schedule_steps=4, sft_batch_size=4, sft_warmup_steps=1,
        grpo_steps=2, grpo_batch_size=2, group_size=2, progress=False,
    )  # fmt: skip
    accuracies = quickstart.run_quickstart(config, local_service)
    assert list(accuracies) == ["before SFT", "after SFT", "after RL"]
    assert all(0.0 <= a <= 1.0 for a in accuracies.values())
    rows = _read(tmp_path / "qs" / "metrics.jsonl")
    assert {r["phase"] for r in rows} == {"eval", "sft", "grpo"}
    evals = [(r["stage"], r["accuracy"]) for r in rows if r["phase"] == "eval"]
    assert evals == list(accuracies.items())  # the printed numbers are the measured ones
    assert [r["step"] for r in rows if r["phase"] == "sft"] == [0, 1, 2]
    assert [r["step"] for r in rows if r["phase"] == "grpo"] == [0, 1]
    assert (tmp_path / "qs" / "quickstart.png").stat().st_size > 10_000


def test_quickstart_sft_stops_early_on_training_problems_never_on_heldout(
    tmp_path, local_service, monkeypatch
):
    checked: list[list[str]] = []
    heldout = {
        p.answer + repr(p.messages)
        for p in quickstart.AdditionTask(seed=0, num_heldout=10).heldout_problems()
    }

    def fake_accuracy(training_client, renderer, problems, max_tokens):
        checked.append([p.answer + repr(p.messages) for p in problems])
        return 0.9 if len(checked) > 2 else 0.0  # the first check is "before SFT", the second falls short

    monkeypatch.setattr(quickstart, "_accuracy_on", fake_accuracy)
    config = quickstart.Config(
        log_dir=tmp_path / "qs", heldout_problems=10, sft_steps=20, sft_schedule_steps=20, sft_batch_size=2,
        sft_warmup_steps=1, sft_stop_accuracy=0.6, sft_check_every=2, sft_check_problems=8, grpo_steps=1,
        grpo_batch_size=2, group_size=2, grpo_eval_every=None, progress=False,
    )  # fmt: skip
    quickstart.run_quickstart(config, local_service)
    rows = _read(tmp_path / "qs" / "metrics.jsonl")
    assert [r["step"] for r in rows if r["phase"] == "sft"] == [0, 1, 2, 3], "stopped at the second check"
    assert [(r["step"], r["train_accuracy"]) for r in rows if r["phase"] == "sft_check"] == [
        (1, 0.0),
        (3, 0.9),
    ]
    checks = [problems for problems in checked if len(problems) == 8]
    assert len(checks) == 2 and not heldout & set(checks[0]), "early stop looks at training problems only"
    assert _read(tmp_path / "qs" / "sft" / "checkpoints.jsonl")[-1]["next_step"] == 4, (
        "the stopped state is saved"
    )


def test_recipes_drive_the_official_tinker_sdk(tmp_path, local_service, monkeypatch):
    """The same loops run with `tinker.ServiceClient` against tether's server (sdk="tinker")."""
    tinker = pytest.importorskip("tinker")
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    service = tinker.ServiceClient(base_url=local_service.base_url, api_key="tml-local")
    conversations = [
        [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": str(2 * i)}]
        for i in range(24)
    ]
    config = sft.Config(
        log_dir=tmp_path / "sft", lora_rank=8, learning_rate=1e-2, lr_schedule="constant", batch_size=8,
        eval_every=2, save_every=None, progress=False, sdk="tinker",
    )  # fmt: skip
    result = sft.train_sft(config, service, conversations[:16], conversations[16:])
    assert [r["step"] for r in result.metrics] == [0, 1]
    assert result.metrics[1]["train_mean_nll"] < result.metrics[0]["train_mean_nll"]
    rl_config = grpo.Config(
        log_dir=tmp_path / "grpo", lora_rank=8, batch_size=2, group_size=4, num_steps=1, max_tokens=4,
        eval_every=1, test_size=10, save_every=None, progress=False, sdk="tinker",
    )  # fmt: skip
    rl = grpo.train_grpo(
        rl_config, service, grpo.problem_source(rl_config), training_client=result.training_client
    )
    assert rl.final_accuracy is not None and abs(rl.metrics[0]["kl_sample_train_v1"]) < 1e-3
