"""The official tinker-cookbook 0.6.1 RL recipes, unmodified, against `tether serve` with their
default loss, `stable_reinforce`: `recipes.math_rl.train` (env=arithmetic) and `recipes.rl_loop`.

What is not the recipes' own, and why:
- The server serves the recipes' default model names (`Qwen/Qwen3.5-9B`, `Qwen/Qwen3.5-9B-Base`)
  as aliases of the embedded tiny model, and the cookbook's tokenizer registry maps those names to
  its tokenizer: nothing is downloaded, and the renderers the recipes pick for those names are used.
- Batch sizes, `max_tokens` and `max_steps` are made small enough for a CPU test.
- rl_loop reads GSM8K with `datasets.load_dataset`; a small arithmetic set in the same columns is
  returned instead (no download). A random tiny model never answers GSM8K, so every group would
  have zero reward variance and rl_loop would skip every training step (it never sends a datum
  then); its `get_reward` is replaced by one that alternates 0, 1 within each group.

Everything else (sampling with `record_stability_info`, `sequence_id`s, provenance spans, the
forward_backward and optim_step calls, checkpoints) is the recipes' code. A spy on the route's
datum conversion shows the server received stable_reinforce datums with provenance.
"""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest

pytest.importorskip("tinker_cookbook")
pytest.importorskip("chz")
datasets = pytest.importorskip("datasets")

from tether.server import routes_training  # noqa: E402
from tether.server.config import ServerConfig  # noqa: E402
from tether.server.main import ServerThread  # noqa: E402

pytestmark = pytest.mark.slow

MATH_MODEL = "Qwen/Qwen3.5-9B"  # math_rl's default
LOOP_MODEL = "Qwen/Qwen3.5-9B-Base"  # rl_loop's default


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, default_model_dir):
    from tinker_cookbook import tokenizer_utils
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    for name in (MATH_MODEL, LOOP_MODEL):
        tokenizer_utils.register_tokenizer(name, lambda: tokenizer)
    config = ServerConfig(
        port=0,
        data_dir=tmp_path_factory.mktemp("tether-data"),
        models=[MATH_MODEL, LOOP_MODEL],
        model_aliases={MATH_MODEL: str(default_model_dir), LOOP_MODEL: str(default_model_dir)},
        long_poll_s=5,
    )
    with ServerThread(config) as url:
        yield url


@pytest.fixture
def received(monkeypatch):
    """(loss_fn, datums, datums whose sampled positions the server filled from its records) per request."""
    calls: list[tuple[str, int, int]] = []
    inner = routes_training.training_data

    def spy(data, loss_fn="cross_entropy", lookup=None):
        out = inner(data, loss_fn, lookup)
        calls.append(
            (loss_fn, len(out), sum(1 for d in out if d.loss_fn_inputs.get("sampled_mask") is not None))
        )
        return out

    monkeypatch.setattr(routes_training, "training_data", spy)
    monkeypatch.setenv("TINKER_API_KEY", "tml-cookbook-tests")
    return calls


def _metrics(log_path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def test_math_rl_arithmetic_trains_with_stable_reinforce(base_url, received, tmp_path):
    from tinker_cookbook.recipes.math_rl import train

    config = train.CLIConfig(
        base_url=base_url,
        log_path=str(tmp_path / "math_rl"),
        groups_per_batch=4,
        max_steps=2,
        behavior_if_log_dir_exists="delete",
    )
    assert config.loss_fn == "stable_reinforce" and config.env == "arithmetic"
    asyncio.run(train.cli_main(config))
    steps = [m for m in _metrics(tmp_path / "math_rl") if "optim/kl_sample_train_v1" in m]
    assert len(steps) == 2  # both steps trained and got the learner's logprobs back
    trained = [(n, filled) for loss_fn, n, filled in received if loss_fn == "stable_reinforce"]
    assert len(trained) >= 2 and all(n == filled > 0 for n, filled in trained)


def test_rl_loop_trains_with_stable_reinforce(base_url, received, tmp_path, monkeypatch):
    from tinker_cookbook.recipes import rl_loop

    rows = {
        "question": [f"What is {a} + {a + 1}?" for a in range(8)],
        "answer": [f"{a} + {a + 1} = {2 * a + 1}\n#### {2 * a + 1}" for a in range(8)],
    }
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda *a, **k: datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}),
    )
    parity = itertools.count()  # rewards 0, 1, 0, 1 within every group: never constant
    monkeypatch.setattr(rl_loop, "get_reward", lambda response, answer: float(next(parity) % 2))
    config = rl_loop.Config(
        base_url=base_url,
        log_path=str(tmp_path / "rl_loop"),
        batch_size=2,
        group_size=4,
        max_tokens=8,
        max_steps=2,
    )
    assert config.loss_fn == "stable_reinforce"
    rl_loop.main(config)
    trained = [(n, filled) for loss_fn, n, filled in received if loss_fn == "stable_reinforce"]
    assert trained and all(n == filled > 0 for n, filled in trained)
    assert any("grad_norm:mean" in m for m in _metrics(tmp_path / "rl_loop"))
