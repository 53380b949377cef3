"""The console's HTTP surface: run metrics JSON, client-logged metrics, Prometheus /metrics, the pages'
JSON, each limited to the caller's key."""

from __future__ import annotations

import httpx
import pytest

import tether
from tether.server.config import ServerConfig
from tether.server.main import ServerThread
from tether.types.errors import NotFoundError, UserInputError

ALICE = {"Authorization": "Bearer tml-alice"}
BOB = {"X-API-Key": "tml-bob"}
STEPS = 3
LEARNING_RATE = 1e-2


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_dir):
    config = ServerConfig(
        port=0,
        data_dir=tmp_path_factory.mktemp("data"),
        api_keys=["tml-alice", "tml-bob"],
        long_poll_s=5,
        metrics_points_per_series=64,
    )
    thread = ServerThread(config)
    with thread as base_url:
        yield thread, base_url


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[1], timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def trained(server):
    """Alice trains STEPS steps with the SDK and logs a client metric per step; returns (run id, losses, tokens)."""
    service = tether.ServiceClient(base_url=server[1], api_key="tml-alice")
    trainer = service.create_lora_training_client(base_model="tether/tiny-qwen3", rank=2).result()
    tokens = list(range(1, 13))
    datum = tether.datum_from_model_input_weights(tether.ModelInput.from_ints(tokens), [1.0] * len(tokens))
    losses = []
    for step in range(STEPS):
        fb = trainer.forward_backward([datum], "cross_entropy")
        trainer.optim_step(tether.AdamParams(learning_rate=LEARNING_RATE)).result()
        losses.append(fb.result().metrics["loss:sum"])
        trainer.log_metrics({"reward": 0.5 * step, "skipped": float("nan")}, step).result()
    with pytest.raises(UserInputError) as info:
        trainer.log_metrics({"reward": "high"}, 0)
    assert info.value.field == "metrics.reward"
    trainer.save_state("ckpt-1").result()
    yield trainer.model_id, losses, len(tokens) - 1
    service.close()


def test_metrics_json_has_one_server_point_per_step_and_the_client_series(http, trained):
    run_id, losses, loss_tokens = trained
    answer = http.get(f"/api/v1/tether/runs/{run_id}/metrics", headers=ALICE)
    assert answer.status_code == 200, answer.text
    series = answer.json()["series"]
    assert [s for s, _ in series["server/loss:sum"]] == list(range(STEPS))
    assert [v for _, v in series["server/loss:sum"]] == pytest.approx(losses)
    assert [v for _, v in series["server/loss:per_token"]] == pytest.approx([x / loss_tokens for x in losses])
    assert [v for _, v in series["server/learning_rate"]] == pytest.approx([LEARNING_RATE] * STEPS)
    assert len(series["server/grad_norm"]) == STEPS and all(v > 0 for _, v in series["server/grad_norm"])
    assert len(series["server/tokens_per_s"]) == STEPS and all(
        v > 0 for _, v in series["server/tokens_per_s"]
    )
    assert series["client/reward"] == [[0, 0.0], [1, 0.5], [2, 1.0]]
    assert "client/skipped" not in series


def test_another_keys_run_is_not_found_and_a_bad_key_is_refused(http, trained, server):
    run_id = trained[0]
    for method in ("GET", "POST"):
        answer = http.request(
            method,
            f"/api/v1/tether/runs/{run_id}/metrics",
            headers=BOB,
            json={"metrics": {"x": 1.0}, "step": 0} if method == "POST" else None,
        )
        assert answer.status_code == 404, answer.text
    assert http.get(f"/api/v1/tether/console/runs/{run_id}", headers=BOB).status_code == 404
    assert http.get(f"/api/v1/tether/runs/{run_id}/metrics").status_code == 401
    assert (
        http.get(
            f"/api/v1/tether/runs/{run_id}/metrics", headers={"Authorization": "Bearer tml-mallory"}
        ).status_code
        == 401
    )
    assert (
        http.get("/api/v1/tether/console/whoami", headers={"Authorization": "Basic tml-alice"}).status_code
        == 401
    )
    service = tether.ServiceClient(base_url=server[1], api_key="tml-bob")
    try:
        bobs = service.create_lora_training_client(base_model="tether/tiny-qwen3", rank=2).result()
        with pytest.raises(NotFoundError):
            tether.TrainingClient.log_metrics(_as_run(bobs, run_id), {"x": 1.0}, 0).result()
    finally:
        service.close()


def _as_run(trainer, run_id):
    """Bob's client aimed at Alice's run id."""
    trainer.model_id = run_id
    return trainer


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"metrics": {"x": "1"}, "step": 0}, "metrics"),
        ({"metrics": {"x": 1.0}, "step": -1}, "step"),
        ({"metrics": {"x": True}}, "metrics"),
        ({"metrics": [1, 2]}, "metrics"),
        ({"step": 1}, "metrics"),
    ],
)
def test_bad_logged_metrics_are_refused_naming_the_field(http, trained, body, field):
    answer = http.post(f"/api/v1/tether/runs/{trained[0]}/metrics", headers=ALICE, json=body)
    assert answer.status_code in (400, 422), answer.text
    assert field in answer.json()["detail"]


def test_a_100000_step_run_answers_at_most_max_points(http, server, trained):
    run_id = trained[0]
    run_metrics = server[0].app.state.tether.run_metrics
    for step in range(100_000):
        run_metrics.record(run_id, step, {"long": float(step % 1000)}, source="client")
    answer = http.get(f"/api/v1/tether/runs/{run_id}/metrics", params={"max_points": 50}, headers=ALICE)
    assert answer.status_code == 200
    long = answer.json()["series"]["client/long"]
    assert 25 <= len(long) <= 50 and long[-1][0] == 99_999
    assert sum(v for _, v in long) / len(long) == pytest.approx(499.5, rel=0.05)
    stored = http.get(f"/api/v1/tether/runs/{run_id}/metrics", params={"max_points": 100_000}, headers=ALICE)
    assert len(stored.json()["series"]["client/long"]) <= 64  # the configured bound
    assert (
        http.get(f"/api/v1/tether/runs/{run_id}/metrics", params={"max_points": 0}, headers=ALICE).status_code
        == 422
    )


def test_prometheus_text_shows_only_the_callers_runs(http, trained):
    run_id = trained[0]
    alice = http.get("/metrics", headers=ALICE)
    assert alice.status_code == 200 and alice.headers["content-type"].startswith("text/plain")
    text = alice.text
    assert f'tether_run_loss_sum{{run_id="{run_id}"}}' in text
    assert f'tether_run_step{{run_id="{run_id}"}} {STEPS - 1}.0' in text
    assert "tether_optim_steps_total" in text and "tether_training_runs 1.0" in text
    bob = http.get("/metrics", headers=BOB).text
    assert run_id not in bob
    assert http.get("/metrics").status_code == 401


def test_console_lists_are_the_callers_own(http, trained):
    run_id = trained[0]
    assert http.get("/api/v1/tether/console/whoami", headers=ALICE).status_code == 200
    runs = http.get("/api/v1/tether/console/runs", headers=ALICE).json()["runs"]
    (mine,) = [r for r in runs if r["run_id"] == run_id]
    assert mine["steps"] == STEPS and mine["checkpoints"] == 1 and mine["lora_rank"] == 2 and mine["live"]
    assert run_id not in {
        r["run_id"] for r in http.get("/api/v1/tether/console/runs", headers=BOB).json()["runs"]
    }
    run = http.get(f"/api/v1/tether/console/runs/{run_id}", headers=ALICE).json()
    assert [c["tinker_path"] for c in run["checkpoint_list"]] == [f"tinker://{run_id}/weights/ckpt-1"]
    sessions = http.get("/api/v1/tether/console/sessions", headers=ALICE).json()["sessions"]
    assert any(run_id in s["training_run_ids"] for s in sessions)
    assert all(
        run_id not in s["training_run_ids"]
        for s in http.get("/api/v1/tether/console/sessions", headers=BOB).json()["sessions"]
    )
    for kind in ("jobs", "deployments"):
        assert http.get(f"/api/v1/tether/console/{kind}", headers=ALICE).json()[kind] == []


def test_the_console_page_and_its_assets_are_served(http):
    page = http.get("/console")
    assert page.status_code == 200 and "/console/static/app.js" in page.text
    for asset, kind in (("app.js", "javascript"), ("app.css", "text/css")):
        answer = http.get(f"/console/static/{asset}")
        assert answer.status_code == 200 and kind in answer.headers["content-type"]
