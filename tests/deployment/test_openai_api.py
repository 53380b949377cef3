"""The deployment's OpenAI-compatible routes, driven by the official `openai` package."""

from __future__ import annotations

import math

import openai
import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from tether.deployment.app import create_app
from tether.deployment.backend import EngineBackend
from tether.deployment.served import ServedWeights
from tether.engine.model_loading import load_base_model
from tether.engine.sampling import SampleRequest

MODEL = "my-deployment"


@pytest.fixture(scope="module")
def setup(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    backend = EngineBackend(load_base_model(str(model_dir)))
    served = ServedWeights(backend, base_model=str(model_dir), state_dir=None)
    app = create_app(served, model_names=[str(model_dir), MODEL], tokenizer=tokenizer)
    with TestClient(app) as http:
        client = openai.OpenAI(
            api_key="unused", base_url="http://testserver/v1", http_client=http, max_retries=0
        )
        yield client, served, tokenizer
    backend.close()


def direct(served, tokens, max_tokens, **kw):
    future, _ = served.submit(SampleRequest(prompt_tokens=tokens, max_tokens=max_tokens, temperature=0, **kw))
    return future.result(timeout=60)


def test_completions_text_and_tokens_with_logprobs(setup):
    client, served, tokenizer = setup
    out = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=6, temperature=0, logprobs=3, stop=None
    )
    choice = out.choices[0]
    prompt_tokens = tokenizer.encode("hello", add_special_tokens=False)
    expected = direct(served, prompt_tokens, 6)
    seq = expected.sequences[0]
    assert choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.token_logprobs) == len(choice.logprobs.tokens) <= 6
    for got, want in zip(choice.logprobs.token_logprobs, seq.logprobs, strict=False):
        assert math.isclose(got, want, abs_tol=1e-5)
    assert all(len(top) == 3 for top in choice.logprobs.top_logprobs)
    assert out.usage.prompt_tokens == len(prompt_tokens)
    # token ids in, as DeploymentSampler sends them
    by_ids = client.completions.create(model=MODEL, prompt=prompt_tokens, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == choice.text
    assert by_ids.model_extra.get("weights_identity") == "base-model"


def test_completion_streaming_matches_the_whole_answer(setup):
    client, _, _ = setup
    whole = client.completions.create(model=MODEL, prompt="abc", max_tokens=5, temperature=0, logprobs=1)
    stream = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=5, temperature=0, logprobs=1, stream=True
    )
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].text for c in chunks)
    assert text.startswith(whole.choices[0].text)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_uses_the_chat_template_and_streams(setup):
    client, served, tokenizer = setup
    messages = [{"role": "user", "content": "Say hi"}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    tokens = list(tokens["input_ids"] if hasattr(tokens, "keys") else tokens)
    assert out.usage.prompt_tokens == len(tokens)
    expected = direct(served, tokens, 5).sequences[0]
    content = out.choices[0].logprobs.content
    for entry, want in zip(content, expected.logprobs, strict=False):
        assert math.isclose(entry.logprob, want, abs_tol=1e-5) and len(entry.top_logprobs) == 2
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == out.choices[0].message.content


def test_bad_requests_are_4xx(setup):
    client, _, _ = setup
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="someone-else", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, logprobs=99)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert [m.id for m in client.models.list()][-1] == MODEL
