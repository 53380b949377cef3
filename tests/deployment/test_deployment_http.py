"""The deployment's HTTP API: hot-load status, transitions with requests in flight, bad input, restart."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from tether.deployment.app import create_app
from tether.deployment.backend import EngineBackend
from tether.deployment.served import BASE_IDENTITY, ServedWeights
from tether.engine.model_loading import load_base_model

from .helpers import GatedBackend, make_chain

PROMPT = [5, 17, 101, 33]


@pytest.fixture(scope="module")
def chain(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    return make_chain(model_dir, root / "store")


@pytest.fixture(scope="module")
def other_chain(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("other")
    return make_chain(model_dir, root / "store", run="sess-2:train:0", steps=1, seed=5, trained_base=True)


@pytest.fixture(scope="module")
def base(model_dir):
    return load_base_model(str(model_dir))


@pytest.fixture
def deployment(base, model_dir, tmp_path):
    from transformers import AutoTokenizer

    backend = GatedBackend(EngineBackend(base))
    served = ServedWeights(backend, base_model=str(model_dir), state_dir=tmp_path / "state")
    app = create_app(
        served,
        model_names=[str(model_dir), "my-deployment"],
        tokenizer=AutoTokenizer.from_pretrained(str(model_dir)),
    )
    with TestClient(app) as client:
        yield client, served, backend
    backend.close()


def wait_loaded(client: TestClient, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get("/hot_load").json()["replicas"][0]
        if state["loading_state"]["stage"] in ("done", "error"):
            return state
        time.sleep(0.02)
    raise AssertionError("hot-load did not finish")


def sample(client: TestClient, max_tokens: int = 8) -> dict:
    response = client.post(
        "/v1/sample", json={"prompt_tokens": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stop": []}
    )
    assert response.status_code == 200, response.text
    return response.json()


def same(a: dict, b: dict) -> bool:
    """Same tokens and logprobs (to batching's float noise): served by the same weights."""
    return all(
        x["tokens"] == y["tokens"]
        and max(abs(p - q) for p, q in zip(x["logprobs"], y["logprobs"], strict=True)) < 1e-4
        for x, y in zip(a["sequences"], b["sequences"], strict=True)
    )


def hotload(client: TestClient, path, **extra) -> dict:
    response = client.post("/hot_load", json={"path": str(path), **extra})
    assert response.status_code == 202, response.text
    return wait_loaded(client)


def test_health_status_and_hotload_switch_the_identity(deployment, chain):
    client, served, _ = deployment
    assert client.get("/healthz").status_code == 200
    assert client.get("/status").json()["current"]["identity"] == BASE_IDENTITY
    before = sample(client)
    state = hotload(client, chain[0])
    assert state["loading_state"]["stage"] == "done" and state["readiness"]
    identity = state["current_snapshot_identity"]
    assert identity.endswith("step-0") and sample(client)["weights_identity"] == identity
    state = hotload(client, chain[1], identity="step-1-abc")
    assert state["current_snapshot_identity"] == "step-1-abc"
    status = client.get("/status").json()["current"]
    assert status["checkpoint_type"] == "delta" and status["base_identity"].endswith("step-0")
    assert not same(sample(client), before)


def test_bad_hotloads_fail_and_keep_serving(deployment, chain, other_chain, tmp_path):
    client, served, _ = deployment
    assert client.post("/hot_load", json={"path": str(tmp_path / "nope")}).status_code == 404
    assert client.post("/hot_load", json={"path": ""}).status_code == 422
    state = hotload(client, chain[1])  # a delta before its parent
    assert state["loading_state"]["stage"] == "error" and "applies to" in state["loading_state"]["error"]
    assert state["current_snapshot_identity"] == BASE_IDENTITY
    hotload(client, chain[0])
    assert hotload(client, chain[2])["loading_state"]["stage"] == "error"  # skips its parent step-1
    good = hotload(client, chain[1])["current_snapshot_identity"]
    reference = sample(client)
    state = hotload(client, other_chain[1])  # a delta of another chain's base
    assert state["loading_state"]["stage"] == "error" and "applies to" in state["loading_state"]["error"]
    assert state["current_snapshot_identity"] == good
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(chain[2], damaged)
    data = damaged / "delta.safetensors"
    data.write_bytes(data.read_bytes()[: len(data.read_bytes()) // 2])  # truncated
    state = hotload(client, damaged)
    assert state["loading_state"]["stage"] == "error" and any(
        w in state["loading_state"]["error"] for w in ("sha256", "truncated")
    )
    assert same(sample(client), reference)  # still the last good weights
    history = client.get("/status").json()["hot_load_history"]
    assert history[-1]["stage"] == "error" and history[-1]["target_snapshot_identity"] == str(damaged)
    assert [h["stage"] for h in history].count("error") >= 3 and "done" in [h["stage"] for h in history]


def test_a_second_hotload_while_one_runs_is_refused(deployment, chain):
    client, served, backend = deployment
    backend.gate.clear()  # requests stay in flight, so a SYNC hot-load waits for them
    threading.Thread(target=sample, args=(client,), daemon=True).start()
    while served._inflight == 0:
        time.sleep(0.01)
    assert client.post("/hot_load", json={"path": str(chain[0]), "transition": "SYNC"}).status_code == 202
    refused = client.post("/hot_load", json={"path": str(chain[0])})
    assert refused.status_code == 409 and "in progress" in refused.json()["detail"]
    backend.gate.set()
    assert wait_loaded(client)["loading_state"]["stage"] == "done"


def _run_in_flight(client, count):
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(sample(client, 12))) for _ in range(count)]
    for thread in threads:
        thread.start()
    return results, threads


def test_async_in_flight_requests_finish_on_the_old_weights(deployment, chain):
    client, served, backend = deployment
    hotload(client, chain[0])
    hotload(client, chain[1])
    old = sample(client, 12)
    hotload(client, chain[2])
    new = sample(client, 12)
    assert not same(old, new)
    hotload(client, chain[0])
    hotload(client, chain[1])
    backend.gate.clear()
    results, threads = _run_in_flight(client, 4)
    while served._inflight < 4:
        time.sleep(0.01)
    state = hotload(client, chain[2], transition="ASYNC")  # completes while the 4 are held
    assert state["loading_state"]["stage"] == "done"
    backend.gate.set()
    late = sample(client, 12)
    for thread in threads:
        thread.join()
    assert len(results) == 4  # none failed
    for result in results:  # each served entirely by the version it names
        assert result["weights_identity"] == old["weights_identity"]
        assert same(result, old)
    assert late["weights_identity"] == new["weights_identity"] and same(late, new)


def test_sync_requests_pause_and_resume_on_the_new_weights(deployment, chain):
    client, served, backend = deployment
    hotload(client, chain[0])
    hotload(client, chain[1])
    old = sample(client, 12)
    backend.gate.clear()
    results, threads = _run_in_flight(client, 2)
    while served._inflight < 2:
        time.sleep(0.01)
    assert client.post("/hot_load", json={"path": str(chain[2]), "transition": "SYNC"}).status_code == 202
    while not served._paused:
        time.sleep(0.01)
    paused: list[dict] = []
    arrival = threading.Thread(target=lambda: paused.append(sample(client, 12)))
    arrival.start()
    time.sleep(0.2)
    assert not paused  # held while the running requests finish
    backend.gate.set()
    arrival.join(timeout=60)
    for thread in threads:
        thread.join()
    assert wait_loaded(client)["loading_state"]["stage"] == "done"
    assert [r["weights_identity"] for r in results] == [old["weights_identity"]] * 2
    assert all(same(r, old) for r in results)
    assert paused[0]["weights_identity"].endswith("step-2") and not same(paused[0], old)


def test_restart_resumes_the_last_good_weights(base, model_dir, chain, tmp_path):
    state_dir = tmp_path / "state"
    first = ServedWeights(EngineBackend(base), base_model=str(model_dir), state_dir=state_dir)
    for path in chain:
        first.hotload(str(path))
    want = first.submit(_greedy())[0].result(timeout=60).sequences[0].tokens
    with pytest.raises(
        Exception, match="sha256|truncated"
    ):  # a hot-load that dies half way changes nothing on disk
        broken = tmp_path / "broken"
        import shutil

        shutil.copytree(chain[2], broken)
        (broken / "delta.safetensors").write_bytes(b"garbage")
        first.hotload(str(broken))
    first.backend.close()
    history = first.history()
    assert [h["stage"] for h in history] == ["done"] * len(chain) + ["error"]
    second = ServedWeights(EngineBackend(base), base_model=str(model_dir), state_dir=state_dir)
    assert second.restore()
    assert second.current.identity.endswith("step-2") and second.current.checkpoint_type == "delta"
    assert second.submit(_greedy())[0].result(timeout=60).sequences[0].tokens == want
    assert second.history() == history  # kept across the restart; the replay is not a new hot-load
    second.backend.close()


def _greedy():
    from tether.engine.sampling import SampleRequest

    return SampleRequest(prompt_tokens=PROMPT, max_tokens=8, temperature=0, stop=[])


def test_any_identity_label_keeps_the_deployment_answering(deployment, chain):
    """A hot-load's identity goes in every answer's header: one that is not latin-1, or holds a
    line break, made every sampling answer a 500 until the next hot-load."""
    from urllib.parse import unquote

    client, _, _ = deployment
    label = "étape-1 😀\r\nx-injected: yes"
    state = hotload(client, chain[0], identity=label)
    assert state["loading_state"]["stage"] == "done" and state["current_snapshot_identity"] == label
    answer = client.post("/v1/sample", json={"prompt_tokens": PROMPT, "max_tokens": 2})
    assert answer.status_code == 200 and answer.json()["weights_identity"] == label
    assert unquote(answer.headers["x-tether-weights-identity"]) == label
    assert "x-injected" not in answer.headers
    body = {"model": "my-deployment", "prompt": PROMPT, "max_tokens": 2}
    for stream in (False, True):
        answer = client.post("/v1/completions", json={**body, "stream": stream})
        assert answer.status_code == 200 and unquote(answer.headers["x-tether-weights-identity"]) == label
    chat = {"model": "my-deployment", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    too_long = client.post("/hot_load", json={"path": str(chain[0]), "identity": "x" * 1025})
    assert too_long.status_code == 422 and "identity" in too_long.json()["detail"]


class _LoadHeldBackend(EngineBackend):
    """Holds every `load` until released: a hot-load stays half done (a process killed there)."""

    def __init__(self, base) -> None:
        super().__init__(base)
        self.entered, self.release = threading.Event(), threading.Event()
        self.release.set()

    def load(self, *args) -> None:
        self.entered.set()
        assert self.release.wait(120)
        super().load(*args)


def test_a_process_killed_mid_hotload_restarts_on_its_last_good_weights(base, model_dir, chain, tmp_path):
    state_dir = tmp_path / "state"
    first = ServedWeights(_LoadHeldBackend(base), base_model=str(model_dir), state_dir=state_dir)
    first.hotload(str(chain[0]))
    first.hotload(str(chain[1]))
    want = first.submit(_greedy())[0].result(timeout=60).sequences[0].tokens
    first.backend.entered.clear()
    first.backend.release.clear()
    loading = first.start_hotload(str(chain[2]))  # files read and verified, the switch not made
    try:
        assert first.backend.entered.wait(120) and first.loading_state().stage == "loading"
        # the process dies here; its successor starts from what is on disk
        second = ServedWeights(EngineBackend(base), base_model=str(model_dir), state_dir=state_dir)
        assert second.restore()
        assert second.current.identity.endswith("step-1") and second.current.chain == [
            str(chain[0]),
            str(chain[1]),
        ]
        assert second.submit(_greedy())[0].result(timeout=60).sequences[0].tokens == want
        assert second.loading_state().stage != "loading"  # it is ready, not stuck half way
        second.backend.close()
    finally:
        first.backend.release.set()
        loading.join(120)
        first.backend.close()


def test_a_finished_hotload_never_refuses_the_next_one(deployment, chain, monkeypatch):
    """The status said "done" (or "error") while the load lock was still held (the history was being
    written): a client starting its next hot-load at once got a 409 "in progress"."""
    client, served, _ = deployment
    seen: list[tuple[str, bool]] = []
    remember = ServedWeights._remember

    def watching(self, finished):
        seen.append((self.loading_state().stage, self._load_lock.locked()))
        remember(self, finished)

    monkeypatch.setattr(ServedWeights, "_remember", watching)
    for path in (chain[0], chain[2], chain[1]):  # done, error (skips its parent), done
        state = hotload(client, path)
        assert state["loading_state"]["stage"] in ("done", "error")
    assert len(seen) == 3 and all(stage == "loading" for stage, _ in seen), seen
    assert [h["stage"] for h in client.get("/status").json()["hot_load_history"]] == ["done", "error", "done"]


def test_a_plain_sampler_checkpoint_hotloads_as_a_base(deployment, model_dir, chain, tmp_path):
    """What the official tinker SDK's `save_weights_for_sampler` writes (full HF weights, no chain
    record) is a complete set of weights: it loads as a base instead of failing "not part of a chain"."""
    from tether.storage import LocalCheckpointStore, StoredHfWeights
    from tether.storage.sampler_chain import read_sampler_checkpoint_dir

    client, _, _ = deployment
    chained = read_sampler_checkpoint_dir(chain[1])  # a delta: its full weights are step-1's
    hotload(client, chain[0])
    step1 = chained.rebuild(read_sampler_checkpoint_dir(chain[0]).weights.tensors)
    store = LocalCheckpointStore(tmp_path / "plain")
    info = store.save_hf_weights(
        "tinker://plain-run/sampler_weights/s1",
        StoredHfWeights(base_model=str(model_dir), tensors=step1),
        base_model_dir=model_dir,
        tokenizer_dir=model_dir,
    )
    plain = store.directory(info.path)
    state = hotload(client, plain, identity="tinker://plain-run/sampler_weights/s1")
    assert state["loading_state"]["stage"] == "done", state["loading_state"]["error"]
    assert state["current_snapshot_identity"] == "tinker://plain-run/sampler_weights/s1"
    status = client.get("/status").json()["current"]
    assert status["checkpoint_type"] == "base"
    served_plain = sample(client, 12)
    hotload(client, chain[0])
    hotload(client, chain[1])
    assert same(sample(client, 12), served_plain)  # the same weights as the chain's step-1
    # a delta whose parent has these very weights applies on top of the plain base (fingerprints match)
    hotload(client, plain, identity="plain")
    assert hotload(client, chain[2])["loading_state"]["stage"] == "done"


def test_a_multi_prompt_completion_is_served_by_one_weight_version(deployment, chain):
    """An ASYNC hot-load landing while the first of a request's prompts runs must not serve the
    second with the new weights (the answer names one version)."""
    client, served, backend = deployment
    hotload(client, chain[0])
    backend.gate.clear()  # the first prompt's answer is held: it stays in flight
    answers: list = []
    body = {"model": "my-deployment", "prompt": [PROMPT, PROMPT], "max_tokens": 6, "temperature": 0}
    request = threading.Thread(target=lambda: answers.append(client.post("/v1/completions", json=body)))
    request.start()
    with served._cond:
        while served._inflight == 0:
            served._cond.wait(0.05)  # submit does not notify: look again shortly
    hotload(client, chain[1])  # ASYNC: completes while the first prompt runs
    backend.gate.set()
    request.join()
    choices = answers[0].json()["choices"]
    tokens = [c["raw_output"]["completion_token_ids"] for c in choices]
    assert tokens[0] == tokens[1]  # the same prompt, greedy, on one version: the same answer


def test_with_an_admin_token_only_its_holder_may_hot_load(base, model_dir, chain, tmp_path):
    from transformers import AutoTokenizer

    backend = EngineBackend(base)
    served = ServedWeights(backend, base_model=str(model_dir), state_dir=tmp_path / "state")
    app = create_app(
        served,
        model_names=[str(model_dir)],
        tokenizer=AutoTokenizer.from_pretrained(str(model_dir)),
        admin_token="s3cret",
    )
    with TestClient(app) as client:
        body = {"path": str(chain[0])}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            refused = client.post("/hot_load", json=body, headers=headers)
            assert refused.status_code == 401, refused.text
            assert "admin token" in refused.json()["detail"]
        assert served.current.identity == BASE_IDENTITY  # nothing started
        assert client.get("/hot_load").status_code == 200  # status stays readable
        accepted = client.post("/hot_load", json=body, headers={"Authorization": "Bearer s3cret"})
        assert accepted.status_code == 202, accepted.text
        assert wait_loaded(client)["loading_state"]["stage"] == "done"
        assert served.current.identity != BASE_IDENTITY
    backend.close()
