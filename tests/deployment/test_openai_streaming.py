"""Streaming from the OpenAI-compatible routes: tokens go out as they are generated, in order, and
the chunks concatenate to the non-streamed answer. Driven by the official `openai` package."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from tether.deployment.app import create_app
from tether.deployment.backend import EngineBackend
from tether.deployment.openai_routes import _Text
from tether.deployment.openai_stream import ChoiceStream, StreamToken
from tether.deployment.served import ServedWeights
from tether.engine.model_loading import load_base_model

MODEL = "my-deployment"
WAIT_S = 60


class HoldingBackend:
    """Wraps a backend: when `hold_at` is set, generation stops inside the callback of that token
    (counted from 1; the token has been handed on) until `release` is set, so the test sees what a
    client got mid-generation."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.base = inner.base
        self.hold_at: int | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        self.futures: list[Future] = []

    def load(self, *args) -> None:
        self.inner.load(*args)

    def unload(self, version: str) -> None:
        self.inner.unload(version)

    def submit(self, request, version, on_token=None) -> Future:
        count = 0

        def relay(index, token, logprob, topk) -> None:
            nonlocal count
            on_token(index, token, logprob, topk)
            count += 1
            if count == self.hold_at:
                self.held.set()
                assert self.release.wait(WAIT_S), "the test never released generation"

        future = self.inner.submit(request, version, relay if on_token is not None else None)
        self.futures.append(future)
        return future

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def deployment(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    backend = HoldingBackend(EngineBackend(load_base_model(str(model_dir))))
    served = ServedWeights(backend, base_model=str(model_dir), state_dir=None)
    app = create_app(served, model_names=[MODEL], tokenizer=tokenizer)
    yield app, backend, tokenizer
    backend.close()


@pytest.fixture(scope="module")
def client(deployment):
    app, _, _ = deployment
    with TestClient(app) as http:
        yield openai.OpenAI(
            api_key="unused", base_url="http://testserver/v1", http_client=http, max_retries=0
        )


@pytest.fixture(scope="module")
def live_url(deployment):
    """The app behind a real HTTP server, so chunks reach the client while the request still runs."""
    app, _, _ = deployment
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
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
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=30)


def test_completion_stream_is_token_by_token_and_matches_the_whole_answer(client):
    kwargs = dict(model=MODEL, prompt="The", max_tokens=12, temperature=1.0, seed=7, logprobs=2)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    content = [c for c in chunks if c.choices and c.choices[0].text]
    assert len(content) > 1
    assert "".join(c.choices[0].text for c in content) == whole.choices[0].text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    streamed_logprobs = [lp for c in content for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed_logprobs == pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=1e-6)
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_stream_is_token_by_token_and_matches_the_whole_answer(client):
    messages = [{"role": "user", "content": "Say something"}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=12, temperature=1.0, seed=3)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1
    assert "".join(content) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_several_samples_stream_under_their_own_index(client):
    kwargs = dict(model=MODEL, prompt="ab", max_tokens=8, temperature=1.0, seed=11, n=3)
    whole = client.completions.create(**kwargs)
    texts = ["", "", ""]
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]


def test_a_stop_string_is_never_streamed(client):
    kwargs = dict(model=MODEL, prompt="x", max_tokens=16, temperature=1.0, seed=2, stop=[])
    free = client.completions.create(**kwargs).choices[0].text
    # a two-character stop string first seen after a few characters of the free answer
    k = next(k for k in range(3, len(free) - 2) if free.find(free[k : k + 2]) == k)
    kwargs["stop"] = free[k : k + 2]
    whole = client.completions.create(**kwargs)
    assert whole.choices[0].text == free[:k]
    stream = client.completions.create(**kwargs, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == free[:k]


def test_held_text_is_released_only_when_final(model_dir):
    """Unit: a trailing EOS, a possible stop-string prefix and a split UTF-8 character wait."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = _Text(tokenizer, [eos])
    ids = tokenizer.encode("ab€", add_special_tokens=False)  # € is three byte tokens
    stream = ChoiceStream(text, ["bz"])
    released = [stream.add(StreamToken(t, 0.0, None))[0] for t in ids]
    assert released == ["a", "", "b", "", "€"]  # "b" might start "bz"; € needs its three bytes
    assert stream.add(StreamToken(eos, 0.0, None)) == ("", [])
    assert stream.finish("ab€", len(ids))[0] == ""


def test_first_chunk_arrives_while_generation_is_still_running(deployment, live_url):
    _, backend, tokenizer = deployment
    client = openai.OpenAI(api_key="unused", base_url=live_url, max_retries=0, timeout=WAIT_S)
    kwargs = dict(model=MODEL, prompt="The", max_tokens=8, temperature=1.0, seed=5, stop=[])
    whole = client.completions.create(**kwargs).choices[0]
    ids = whole.model_extra["raw_output"]["completion_token_ids"]
    # the first token after which the answer has a whole character to send
    first = next(i for i in range(len(ids)) if tokenizer.decode(ids[: i + 1]).rstrip("\ufffd"))
    assert first < len(ids) - 1
    backend.hold_at, backend.futures = first + 1, []
    try:
        texts = []
        for chunk in client.completions.create(**kwargs, stream=True):
            if chunk.choices and chunk.choices[0].text:
                if not texts:  # the first content: generation is stopped inside a token's callback
                    assert backend.held.is_set() and not backend.futures[0].done()
                    backend.release.set()
                texts.append(chunk.choices[0].text)
    finally:
        backend.hold_at = None
        backend.release.set()
    assert len(texts) > 1 and "".join(texts) == whole.text


def test_a_long_answer_streams_exactly_while_decoding_only_its_tail(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    answer = "Grüße aus Zürich — 東京 too! " * 12
    ids = tokenizer.encode(answer, add_special_tokens=False)
    stream = ChoiceStream(_Text(tokenizer, []), ["STOP"])
    released = "".join(stream.add(StreamToken(t, 0.0, None))[0] for t in ids)
    released += stream.finish(tokenizer.decode(ids), len(ids))[0]
    assert released == answer and stream.anchor > len(ids) // 2
