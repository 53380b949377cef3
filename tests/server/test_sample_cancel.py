"""Shared mode: `cancel_future` on a running `asample` stops it in the sampling engine (KV cache
freed), gives back the model's pending-sample reservation, and the future answers "cancelled";
with the trainer in this process, and with a `tether trainer` across a socket (`trainer_addresses`:
here served on a thread of this process, so the test can reach its engine).

Synchronisation: the engine's token callback holds generation until the engine's future is
cancelled, so the sample is certainly running when the test cancels it; then the test waits on the
engine's stats. No sleeps.
"""

from __future__ import annotations

import threading

import httpx
import pytest

from tether.server.config import ServerConfig
from tether.server.main import ServerThread
from tether.trainer.config import EngineSettings, TrainerConfig
from tether.trainer.local import InProcessTrainer
from tether.trainer.process import serve_trainer

ALICE = {"X-API-Key": "tml-alice"}
BASE = "tether/tiny-qwen3"
WAIT_S = 60


def retrieve(client: httpx.Client, request_id: str) -> bytes | dict:
    """The sample's encoded response (bytes), or the JSON error body."""
    while True:
        answer = client.post("/api/v1/retrieve_future", json={"request_id": request_id}, headers=ALICE)
        if answer.headers["content-type"].startswith("application/x-protobuf"):
            return answer.content
        body = answer.json()
        if body.get("type") != "try_again":
            return body


def serve_on_a_thread(data_dir) -> tuple[InProcessTrainer, str]:
    """A `tether trainer` serving on a daemon thread of this process: (its trainer, `host:port`)."""
    settings = EngineSettings(data_dir=data_dir, device="cpu", dtype="float32", torch_threads=1)
    trainer = InProcessTrainer(BASE, settings)
    ready = data_dir / "ready"
    config = TrainerConfig(base_model=BASE, ready_file=ready, port=0, **settings.model_dump())
    threading.Thread(target=serve_trainer, args=(config,), kwargs={"trainer": trainer}, daemon=True).start()
    listening = threading.Event()
    while not ready.exists():  # written by the serving thread once it listens
        listening.wait(0.01)
    return trainer, ready.read_text()


@pytest.mark.parametrize("where", ["in_process", "remote"])
def test_cancel_future_stops_a_running_sample_and_frees_its_reservation(
    tmp_path, default_model_dir, monkeypatch, where
):
    remote = None
    addresses = {}
    if where == "remote":
        (tmp_path / "trainer").mkdir()
        remote, addresses[BASE] = serve_on_a_thread(tmp_path / "trainer")
    config = ServerConfig(
        port=0, data_dir=tmp_path, max_pending_samples=2, long_poll_s=5, trainer_addresses=addresses
    )
    server = ServerThread(config)
    with server as base_url, httpx.Client(base_url=base_url, timeout=WAIT_S) as client:
        session = client.post(
            "/api/v1/create_session", json={"tags": [], "sdk_version": "test"}, headers=ALICE
        ).json()["session_id"]
        sampler = client.post(
            "/api/v1/create_sampling_session",
            headers=ALICE,
            json={"session_id": session, "sampling_session_seq_id": 0, "base_model": BASE},
        ).json()["sampling_session_id"]

        def sample(max_tokens: int, seq_id: int) -> str:
            body = {
                "sampling_session_id": sampler,
                "seq_id": seq_id,
                "num_samples": 2,
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": [104, 105]}]},
                "sampling_params": {"max_tokens": max_tokens, "temperature": 1.0, "stop": []},
            }
            answer = client.post("/api/v1/asample", json=body, headers=ALICE)
            assert answer.status_code == 200, answer.text
            return answer.json()["request_id"]

        assert isinstance(retrieve(client, sample(2, 0)), bytes)  # builds the engine
        state = server.app.state.tether
        engine = (remote or state.trainers.get(BASE)).executor.sampling
        held = threading.Event()
        real_submit = engine.submit

        def holding_submit(request, on_token=None):
            cancelled = threading.Event()
            count = 0

            def hold(*token) -> None:
                nonlocal count
                count += 1
                if count == 3:
                    held.set()
                    cancelled.wait(WAIT_S)  # never cancelled: the sample runs on, the test fails

            future = real_submit(request, on_token=hold)
            future.add_done_callback(lambda f: f.cancelled() and cancelled.set())
            return future

        monkeypatch.setattr(engine, "submit", holding_submit)
        request_id = sample(100, 1)
        assert held.wait(WAIT_S)
        answer = client.post("/api/v1/cancel_future", json={"request_id": request_id}, headers=ALICE)
        assert answer.json() == {"cancelled": True}
        stats = engine.wait_for_stats(
            lambda s: s.cancelled == 1 and s.running_sequences == 0 and s.reserved_tokens == 0, WAIT_S
        )
        assert (stats.completed, stats.failed) == (1, 0)
        error = retrieve(client, request_id)
        assert isinstance(error, dict) and "cancelled" in error["error"]
        state.results.submit(lambda: None).result(timeout=WAIT_S)  # the op's undo ran before this
        assert state.live.reserve_samples(BASE, 2, 2), "its two pending samples were given back"
        state.live.release_samples(BASE, 2)
        monkeypatch.undo()
        assert isinstance(retrieve(client, sample(3, 2)), bytes)
