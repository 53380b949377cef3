"""A client that goes away stops its work: streamed and whole OpenAI answers, and `/v1/sample`, whose
connection closes mid-generation are cancelled in the engine (KV reservation back to the pool), the
deployment keeps serving, and its status counts them as cancelled, not failed. The same holds
through `tether serve`'s proxy to the deployment (the path DeploymentSampler takes).

The app runs behind a real uvicorn server (httptools, as `python -m tether.deployment` runs it).
Synchronisation: the request under test stops generating inside one of its token callbacks until
its future is cancelled (which only the server's disconnect handling does); the test closes the
connection once generation is held there, then waits on the engine's stats. No sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from transformers import AutoTokenizer

from tether.deployment.app import create_app
from tether.deployment.backend import EngineBackend
from tether.deployment.served import ServedWeights
from tether.engine.model_loading import load_base_model
from tether.server import routes_deployments
from tether.server.state import request_owner

MODEL = "my-deployment"
WAIT_S = 60
MESSAGES = [{"role": "user", "content": "Say something"}]


class HoldUntilCancelled:
    """Wraps the engine backend: once `arm(k)` is called, the next request stops generating inside
    its k-th token callback (`held` is set) until its future is cancelled."""

    def __init__(self, inner: EngineBackend) -> None:
        self.inner = inner
        self.base = inner.base
        self.engine = inner.engine
        self.hold_at: int | None = None
        self.held = threading.Event()

    def arm(self, at: int) -> None:
        self.held.clear()
        self.hold_at = at

    def load(self, *args) -> None:
        self.inner.load(*args)

    def unload(self, version: str) -> None:
        self.inner.unload(version)

    def stats(self) -> dict[str, int]:
        return self.inner.stats()

    def submit(self, request, version, on_token=None):
        hold_at, self.hold_at = self.hold_at, None
        if hold_at is None:
            return self.inner.submit(request, version, on_token)
        cancelled = threading.Event()
        count = 0

        def relay(*token) -> None:
            nonlocal count
            if on_token is not None:
                on_token(*token)
            count += 1
            if count == hold_at:
                self.held.set()
                cancelled.wait(WAIT_S)  # without cancellation the request runs on; the test fails

        future = self.inner.submit(request, version, relay)
        future.add_done_callback(lambda f: f.cancelled() and cancelled.set())
        return future

    def close(self) -> None:
        self.inner.close()


@contextlib.contextmanager
def live(app):
    """`app` behind a real uvicorn server (httptools, as deployments run); yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", http="httptools")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    started = threading.Event()
    for _ in range(3000):
        if server.started:
            started.set()
            break
        started.wait(0.01)
    assert started.is_set(), "the test server did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def deployment(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    backend = HoldUntilCancelled(EngineBackend(load_base_model(str(model_dir))))
    served = ServedWeights(backend, base_model=str(model_dir), state_dir=None)
    with live(create_app(served, model_names=[MODEL], tokenizer=tokenizer)) as url:
        yield url, backend
    backend.close()


class OneDeployment:
    """The control plane's registry, reduced to the URL of the one deployment under test."""

    def __init__(self, url: str) -> None:
        self._url = url

    def url(self, deployment_id: str, owner: str) -> str:
        return self._url


@pytest.fixture(scope="module")
def proxied(deployment):
    """`tether serve`'s deployment proxy (its router alone) in front of the deployment."""
    url, backend = deployment
    app = FastAPI()
    routes_deployments.install(app)
    app.dependency_overrides[routes_deployments.registry] = lambda: OneDeployment(url)
    app.dependency_overrides[request_owner] = lambda: "owner"
    with live(app) as proxy_url:
        yield f"{proxy_url}/api/v1/tether/deployments/d1", backend


def settled_after_cancel(backend: HoldUntilCancelled, before):
    """Wait until the engine counted one more cancelled request and holds nothing."""
    stats = backend.engine.wait_for_stats(
        lambda s: s.cancelled == before.cancelled + 1 and s.running_sequences == 0 and s.reserved_tokens == 0,
        WAIT_S,
    )
    assert stats.failed == before.failed and stats.waiting_requests == 0
    return stats


def post_then_disconnect(backend: HoldUntilCancelled, url: str, body: dict) -> None:
    """POST `body` for a whole answer, wait until a request is held in its third token, then close
    the connection (httpx does when the call is cancelled)."""

    async def client_gives_up() -> None:
        async with httpx.AsyncClient(timeout=WAIT_S) as http:
            backend.arm(at=3)
            call = asyncio.create_task(http.post(url, json=body))
            assert await asyncio.to_thread(backend.held.wait, WAIT_S)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    asyncio.run(client_gives_up())


def still_serves(base_url: str) -> None:
    client = openai.OpenAI(api_key="unused", base_url=f"{base_url}/v1", max_retries=0, timeout=WAIT_S)
    answer = client.completions.create(model=MODEL, prompt="ab", max_tokens=4, stop=[], seed=1)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 4


@pytest.fixture(params=["direct", "through the proxy"])
def target(request):
    """The deployment's own URL, or the control plane's proxy path to it."""
    fixture = "deployment" if request.param == "direct" else "proxied"
    return request.getfixturevalue(fixture)


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_a_stream_whose_client_closes_is_cancelled_and_frees_its_kv_cache(target, route):
    base_url, backend = target
    before = backend.engine.stats()
    client = openai.OpenAI(api_key="unused", base_url=f"{base_url}/v1", max_retries=0, timeout=WAIT_S)
    backend.arm(at=3)
    if route == "chat":  # the role chunk goes out before any token
        stream = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=80, stop=[], seed=2, stream=True
        )
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
    else:  # the echoed prompt goes out before any token
        stream = client.completions.create(
            model=MODEL, prompt="The", echo=True, max_tokens=80, stop=[], seed=2, stream=True
        )
        first = next(iter(stream))
        assert first.choices[0].text == "The"
    assert backend.held.wait(WAIT_S)  # generating, stopped inside its third token
    stream.close()  # the client goes away mid-answer
    settled_after_cancel(backend, before)
    still_serves(base_url)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"model": MODEL, "prompt": "The", "max_tokens": 80, "stop": []}),
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 80, "stop": []}),
        ("/v1/sample", {"prompt_tokens": [1, 2, 3], "max_tokens": 80, "stop": [], "num_samples": 2}),
    ],
)
def test_a_whole_answer_whose_client_goes_away_is_cancelled(target, path, body):
    """As when an `openai.AsyncOpenAI` call (or DeploymentSampler's) is cancelled or times out."""
    base_url, backend = target
    before = backend.engine.stats()

    post_then_disconnect(backend, f"{base_url}{path}", body)
    settled_after_cancel(backend, before)
    still_serves(base_url)


def test_status_counts_cancelled_requests_apart_from_failed_ones(deployment):
    base_url, backend = deployment
    before = backend.engine.stats()
    client = openai.OpenAI(api_key="unused", base_url=f"{base_url}/v1", max_retries=0, timeout=WAIT_S)
    backend.arm(at=2)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=80, stop=[], stream=True
    )
    next(iter(stream))
    assert backend.held.wait(WAIT_S)
    stream.close()
    settled_after_cancel(backend, before)
    requests = httpx.get(f"{base_url}/status", timeout=WAIT_S).json()["requests"]
    assert requests["cancelled"] == before.cancelled + 1
    assert requests["failed"] == before.failed == 0
    assert requests["running_sequences"] == requests["reserved_tokens"] == 0


def test_a_whole_answer_of_several_prompts_whose_client_goes_away_cancels_every_prompt(deployment):
    """All prompts are queued at once (one request each) and one disconnect cancels them all."""
    base_url, backend = deployment
    prompts = ["The", "Once upon a time", "ab"]
    before = backend.engine.stats()

    body = {"model": MODEL, "prompt": prompts, "max_tokens": 80, "stop": [], "seed": 4}
    post_then_disconnect(
        backend, f"{base_url}/v1/completions", body
    )  # the first prompt stops in its 3rd token
    stats = backend.engine.wait_for_stats(
        lambda s: (
            s.cancelled == before.cancelled + len(prompts)
            and s.running_sequences == 0
            and s.reserved_tokens == 0
        ),
        WAIT_S,
    )
    assert stats.failed == before.failed and stats.completed == before.completed
    assert stats.waiting_requests == 0
    still_serves(base_url)
