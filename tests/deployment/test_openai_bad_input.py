"""Hostile input to a deployment's OpenAI routes, sent with the official `openai` package.

Each request is one a careless or hostile client can send: the answer must be a 4xx naming the
field (never a 500), and the deployment must keep serving afterwards. Content parts, the one
valid shape among them, must reach the model as text instead of vanishing.
"""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from tether.deployment.app import create_app
from tether.deployment.backend import EngineBackend
from tether.deployment.served import ServedWeights
from tether.engine.model_loading import load_base_model
from tether.types.errors import UserInputError
from tether.types.sample_request import ModelLimits, normalize_stop

MODEL = "my-deployment"
USER = [{"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module")
def http(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    backend = EngineBackend(load_base_model(str(model_dir)))
    served = ServedWeights(backend, base_model=str(model_dir), state_dir=None)
    app = create_app(served, model_names=[MODEL], tokenizer=tokenizer)
    with TestClient(app, raise_server_exceptions=False) as http:
        yield http
    backend.close()


@pytest.fixture
def client(http):
    return openai.OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=http, max_retries=0)


def refused(call, error=openai.BadRequestError, field: str | None = None) -> str:
    with pytest.raises(error) as info:
        call()
    message = str(info.value)  # the openai package shows the server's message (OpenAI's error shape)
    assert field is None or (f"'{field}'" in message and info.value.param == field), message
    return message


@pytest.mark.parametrize("stream", [False, True])
def test_text_that_is_not_unicode_is_a_400_naming_the_field(http, client, stream):
    """JSON may carry lone surrogates ("\\ud800"; the openai package cannot send them, a raw client
    can): no tokenizer encodes them, and they used to be 500s."""
    cases = [
        ("completions", {"prompt": "hi \ud800"}, "prompt"),
        ("completions", {"prompt": ["ok", "\udfff"]}, "prompt"),
        ("completions", {"prompt": "hi", "stop": ["x", "\ud800"]}, "stop"),
        ("chat/completions", {"messages": USER, "stop": "\udfff"}, "stop"),
        ("chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
    ]
    for route, body, field in cases:
        raw = json.dumps({"model": MODEL, "max_tokens": 2, "stream": stream, **body})  # ASCII: \ud800 escapes
        answer = http.post(f"/v1/{route}", content=raw, headers={"content-type": "application/json"})
        assert answer.status_code == 400 and f"'{field}'" in answer.json()["detail"], (route, answer.text)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices  # still serving


def test_a_stop_string_with_a_lone_surrogate_is_refused_where_requests_are_checked():
    limits = ModelLimits(vocab_size=10, max_context_length=8)
    with pytest.raises(UserInputError, match="not valid Unicode") as info:
        normalize_stop(["ok", "\ud800"], limits)
    assert info.value.field == "stop"
    assert normalize_stop(["ok", "é😀"], limits).strings == ("ok", "é😀")


def test_empty_or_wrongly_typed_prompts_are_refused(client):
    refused(lambda: client.completions.create(model=MODEL, prompt=[], max_tokens=2), field="prompt")
    # `true` is not token 1 (pydantic's lax mode would take it as 1)
    refused(
        lambda: client.completions.create(model=MODEL, prompt=[True, 5], max_tokens=2),
        openai.UnprocessableEntityError,
    )


def test_more_prompts_than_one_request_may_queue_are_a_400_not_a_retryable_429(client):
    from tether.deployment.openai_routes import MAX_PROMPTS

    too_many = [[5, 6]] * (MAX_PROMPTS + 1)
    refused(lambda: client.completions.create(model=MODEL, prompt=too_many, max_tokens=1), field="prompt")


def test_max_completion_tokens_zero_is_not_read_as_absent(client):
    """0 is out of range: it used to fall through to max_tokens (None = up to the whole context)."""
    refused(
        lambda: client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=0),
        field="max_tokens",
    )


def test_top_logprobs_out_of_range_is_refused_even_without_logprobs(client):
    refused(
        lambda: client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, top_logprobs=10**6),
        field="top_logprobs",
    )


def test_roles_and_content_parts_the_template_would_drop_are_refused(client):
    """A chat template silently renders an unknown role, or a list of content parts, as nothing."""
    refused(
        lambda: client.chat.completions.create(
            model=MODEL, messages=[{"role": "wizard", "content": "x"}], max_tokens=2
        ),
        openai.UnprocessableEntityError,
    )
    for part in ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, {"foo": 1}, {"type": "text"}):
        refused(
            lambda part=part: client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": [part]}], max_tokens=2
            ),
            field="messages[0].content[0]",
        )


def test_text_content_parts_reach_the_model_as_text(client):
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]
    as_parts = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=3, temperature=0
    )
    as_text = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say\nhi"}], max_tokens=3, temperature=0
    )
    prompt = as_parts.choices[0].model_extra["raw_output"]["prompt_token_ids"]
    assert prompt == as_text.choices[0].model_extra["raw_output"]["prompt_token_ids"]
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("logit_bias", {"5": 100}),
        ("presence_penalty", 1.5),
        ("frequency_penalty", -0.5),
        ("best_of", 3),
        ("suffix", " end"),
    ],
)
def test_completion_options_tether_cannot_honour_are_refused_not_ignored(client, option, value):
    """Ignoring them would answer something else than was asked (logit_bias {5: 100} must give 5s)."""
    refused(
        lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=2, **{option: value}),
        field=option,
    )


def test_chat_options_tether_cannot_honour_are_refused_and_neutral_ones_pass(client):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for option, value in (
        ("tools", [tool]),
        ("response_format", {"type": "json_object"}),
        ("logit_bias", {"5": 1}),
    ):
        refused(
            lambda option=option, value=value: client.chat.completions.create(
                model=MODEL, messages=USER, max_tokens=2, **{option: value}
            ),
            field=option,
        )
    neutral = {
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "response_format": {"type": "text"},
    }
    assert client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=2, user="u", **neutral
    ).choices
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=2, best_of=2).choices


def test_token_in_sampling_takes_token_ids_only(http):
    for prompt in ([True, 5], ["5"], [1.0]):
        answer = http.post("/v1/sample", json={"prompt_tokens": prompt, "max_tokens": 2})
        assert answer.status_code == 422 and "prompt_tokens" in answer.json()["detail"], (prompt, answer.text)
    answer = http.post("/v1/sample", json={"prompt_tokens": [1, 2], "max_tokens": 2, "stop": [True]})
    assert answer.status_code == 422
    assert http.post("/v1/sample", json={"prompt_tokens": [1, 2], "max_tokens": 2}).status_code == 200


def test_a_chat_stream_reports_usage_when_asked(client):
    """`stream_options={"include_usage": True}` (what LangChain and others send) got no usage chunk."""
    whole = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=USER,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    got, want = chunks[-1].usage, whole.usage
    assert (got.prompt_tokens, got.completion_tokens, got.total_tokens) == (
        want.prompt_tokens,
        want.completion_tokens,
        want.total_tokens,
    )
    plain = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, stream=True))
    assert all(c.usage is None for c in plain)
