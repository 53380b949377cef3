"""Shared mode: `cancel_future` on a running `asample` stops it in the sampling engine (KV cache
freed), gives back the model's pending-sample reservation, and the future answers "cancelled".

Synchronisation: the engine's token callback holds generation until the engine's future is
cancelled, so the sample is certainly running when the test cancels it; then the test waits on the
engine's stats. No sleeps.
"""

from __future__ import annotations

import threading

import httpx

from tether.server.config import ServerConfig
from tether.server.main import ServerThread

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


def test_cancel_future_stops_a_running_sample_and_frees_its_reservation(
    tmp_path, default_model_dir, monkeypatch
):
    config = ServerConfig(port=0, data_dir=tmp_path, max_pending_samples=2, long_poll_s=5)
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
        engine = state.trainers.get(BASE).executor.sampling
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
