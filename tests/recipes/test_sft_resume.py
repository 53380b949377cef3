"""SFT resume continues with exactly the next batch: bookkeeping checked against a recording fake client.

The fake trainer's "weights" are the list of batches its optimizer steps applied, and a saved
state is a copy of that list, so an interrupted-and-resumed run must end with the same list as an
uninterrupted one: any replayed or skipped batch shows up as a difference.
"""

from __future__ import annotations

import json
from concurrent.futures import Future

import numpy as np
import pytest

from tether.recipes import sft
from tether.types.data import ForwardBackwardOutput, OptimStepResponse, SaveWeightsResponse, TensorData
from tether.types.errors import UserInputError

CONVERSATIONS = [
    [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": str(2 * i)}] for i in range(23)
]


def _done(value):
    future: Future = Future()
    future.set_result(value)
    return future


class _Crash(Exception):
    pass


class FakeTrainingClient:
    def __init__(self, store: dict, tokenizer, history=(), crash_on_save: str | None = None):
        self.store, self.tokenizer, self.crash_on_save = store, tokenizer, crash_on_save
        self.history = list(history)
        self.pending = None
        self.learning_rates: list[float] = []

    def get_tokenizer(self):
        return self.tokenizer

    def _outputs(self, data):
        return ForwardBackwardOutput(
            "ArrayRecord",
            [
                {"logprobs": TensorData.from_numpy(np.full(d.model_input.length, -1.0, np.float32))}
                for d in data
            ],
        )

    def forward(self, data, loss_fn, loss_fn_config=None):
        return _done(self._outputs(data))

    def forward_backward(self, data, loss_fn, loss_fn_config=None):
        assert self.pending is None
        self.pending = tuple(bytes(t for t in d.model_input.to_ints() if t < 256).decode() for d in data)
        return _done(self._outputs(data))

    def optim_step(self, params):
        self.learning_rates.append(params.learning_rate)
        self.history.append(self.pending)
        self.pending = None
        return _done(OptimStepResponse(metrics={}))

    def save_state(self, name):
        if name == self.crash_on_save:
            raise _Crash(name)
        path = f"tinker://run/weights/{name}"
        self.store[path] = list(self.history)
        return _done(SaveWeightsResponse(path=path))


class FakeService:
    def __init__(self, tokenizer, crash_on_save=None):
        self.store: dict = {}
        self.tokenizer, self.crash_on_save = tokenizer, crash_on_save
        self.clients: list[FakeTrainingClient] = []

    def create_lora_training_client(self, base_model, rank, seed=None):
        self.clients.append(FakeTrainingClient(self.store, self.tokenizer, crash_on_save=self.crash_on_save))
        return _done(self.clients[-1])

    def create_training_client_from_state_with_optimizer(self, path):
        self.clients.append(FakeTrainingClient(self.store, self.tokenizer, history=self.store[path]))
        return _done(self.clients[-1])


@pytest.fixture(scope="module")
def tokenizer():
    from tether.engine.default_model import build_tokenizer

    return build_tokenizer()


def _config(tmp_path, **overrides):
    values = dict(log_dir=tmp_path, batch_size=3, num_epochs=2, save_every=2, eval_every=None, progress=False)
    return sft.Config(**{**values, **overrides})


def test_interrupted_run_resumes_with_exactly_the_next_batch(tmp_path, tokenizer):
    straight = FakeService(tokenizer)
    sft.train_sft(_config(tmp_path / "straight"), straight, CONVERSATIONS)
    expected = straight.clients[0].history
    assert len(expected) == 14  # 23 // 3 = 7 batches per epoch, 2 epochs

    crashing = FakeService(tokenizer, crash_on_save="sft-000006")
    with pytest.raises(_Crash):
        sft.train_sft(_config(tmp_path / "resumed"), crashing, CONVERSATIONS)
    assert len(crashing.clients[0].history) == 6  # steps 0..5 ran; the last good checkpoint holds 0..3
    resumed = sft.train_sft(_config(tmp_path / "resumed"), crashing, CONVERSATIONS)

    assert resumed.steps_run == 10
    assert crashing.clients[-1].history == expected
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(14)), "each step logged once, in order"
    assert (tmp_path / "resumed" / "metrics.jsonl.pre_resume_000004").exists()


def test_finished_run_rerun_does_nothing_and_a_changed_plan_is_refused(tmp_path, tokenizer):
    service = FakeService(tokenizer)
    sft.train_sft(_config(tmp_path), service, CONVERSATIONS)
    again = sft.train_sft(_config(tmp_path), service, CONVERSATIONS)
    assert again.steps_run == 0
    with pytest.raises(UserInputError) as info:
        sft.train_sft(_config(tmp_path, batch_size=4), service, CONVERSATIONS)
    assert info.value.field == "resume"


def test_max_steps_stops_early_and_saves_the_last_state(tmp_path, tokenizer):
    service = FakeService(tokenizer)
    result = sft.train_sft(_config(tmp_path, max_steps=3, save_every=None), service, CONVERSATIONS)
    assert result.steps_run == 3 and result.final_state_path == "tinker://run/weights/sft-000003"
    rows = [json.loads(line) for line in (tmp_path / "checkpoints.jsonl").read_text().splitlines()]
    assert [r["next_step"] for r in rows] == [3]


def test_max_steps_cuts_the_run_but_not_the_learning_rate_schedule(tmp_path, tokenizer):
    service = FakeService(tokenizer)
    config = _config(tmp_path, max_steps=4, lr_schedule="linear", learning_rate=1.0, save_every=None)
    sft.train_sft(config, service, CONVERSATIONS)
    total = (len(CONVERSATIONS) // 3) * 2  # the whole plan: 14 steps
    assert service.clients[0].learning_rates == pytest.approx([1 - s / total for s in range(4)])
