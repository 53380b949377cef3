"""parse_response round trips, and choosing a renderer by name or by model name."""

from __future__ import annotations

import pytest

from tether.renderers import (
    ParseTermination,
    TrainOnWhat,
    get_renderer,
    recommended_renderer_name,
    register_renderer,
    renderer_for_model,
    renderer_names,
)
from tether.renderers.role_colon import RoleColonRenderer
from tether.types.errors import UserInputError

PROMPT = [{"role": "user", "content": "What is 12+34?"}]
ANSWERS = [
    {"role": "assistant", "content": "46"},
    {"role": "assistant", "content": "line one\nline two, ünïcode ✓"},
]


def _sampled_tokens(renderer, answer):
    """What a sampler returns for `answer`: the trained tokens of the last message, stop included."""
    tokens, weights = renderer.build_supervised_example([*PROMPT, answer], TrainOnWhat.LAST_ASSISTANT_MESSAGE)
    prompt = renderer.build_generation_prompt(PROMPT).to_ints()
    all_tokens = tokens.to_ints()
    assert all_tokens[: len(prompt)] == prompt, "the supervised example starts with the generation prompt"
    assert not any(weights[: len(prompt)])
    return all_tokens[len(prompt) :]


@pytest.mark.parametrize("renderer_name", ["role_colon", "qwen3", "qwen3_disable_thinking", "chat_template"])
@pytest.mark.parametrize("answer", ANSWERS)
def test_parse_response_round_trips_on_the_default_tokenizer(qwen_tokenizer, renderer_name, answer):
    renderer = get_renderer(renderer_name, qwen_tokenizer)
    message, termination = renderer.parse_response(_sampled_tokens(renderer, answer))
    assert message == answer
    assert termination is ParseTermination.STOP_SEQUENCE and termination.is_clean


@pytest.mark.parametrize("renderer_name", ["llama3", "chat_template", "role_colon"])
def test_parse_response_round_trips_on_a_llama_tokenizer(llama_tokenizer, renderer_name):
    renderer = get_renderer(renderer_name, llama_tokenizer)
    for answer in ANSWERS:
        assert renderer.parse_response(_sampled_tokens(renderer, answer)) == (
            answer,
            ParseTermination.STOP_SEQUENCE,
        )


def test_qwen3_round_trips_reasoning(qwen_tokenizer):
    renderer = get_renderer("qwen3", qwen_tokenizer)
    answer = {"role": "assistant", "content": "46", "reasoning_content": "6+4 is 10, carry"}
    assert renderer.parse_response(_sampled_tokens(renderer, answer)) == (
        answer,
        ParseTermination.STOP_SEQUENCE,
    )


@pytest.mark.parametrize("renderer_name", ["role_colon", "qwen3", "chat_template"])
def test_a_response_cut_by_the_length_limit_is_malformed(qwen_tokenizer, renderer_name):
    renderer = get_renderer(renderer_name, qwen_tokenizer)
    tokens = _sampled_tokens(renderer, ANSWERS[1])
    message, termination = renderer.parse_response(tokens[:5])
    assert termination is ParseTermination.MALFORMED and not termination.is_clean
    assert message["role"] == "assistant"


def test_tokens_after_the_stop_token_make_the_response_malformed(qwen_tokenizer):
    renderer = get_renderer("qwen3", qwen_tokenizer)
    message, termination = renderer.parse_response([*b"46", 256, *b"xx"])
    assert (message["content"], termination) == ("46", ParseTermination.MALFORMED)


def test_llama3_eos_token_is_a_clean_end(llama_tokenizer):
    renderer = get_renderer("llama3", llama_tokenizer)
    end_of_text = llama_tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    assert renderer.parse_response([*b"hi", end_of_text]) == ({"role": "assistant", "content": "hi"}, "eos")


def test_registry_lists_the_built_in_renderers_and_accepts_new_ones(qwen_tokenizer):
    assert {"role_colon", "llama3", "qwen3", "qwen3_disable_thinking", "chat_template"} <= set(
        renderer_names()
    )
    register_renderer("my_format", RoleColonRenderer)
    assert isinstance(get_renderer("my_format", qwen_tokenizer), RoleColonRenderer)
    with pytest.raises(UserInputError) as info:
        get_renderer("no_such_format", qwen_tokenizer)
    assert info.value.field == "renderer_name"


@pytest.mark.parametrize(
    ("model_name", "expected"),
    [
        ("tether/tiny-qwen3", "qwen3_disable_thinking"),
        ("Qwen/Qwen3-8B", "qwen3"),
        ("Qwen/Qwen3-30B-A3B", "qwen3"),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama3"),
        ("meta-llama/Llama-3.2-1B", "role_colon"),
        ("Qwen/Qwen3-8B-Base", "role_colon"),
        ("Qwen/Qwen3-8B:peft:131072", "qwen3"),
    ],
)
def test_known_families_by_model_name(model_name, expected, plain_tokenizer):
    assert recommended_renderer_name(model_name, plain_tokenizer) == expected


def test_unknown_models_fall_back_to_the_template_then_role_colon(qwen_tokenizer, plain_tokenizer):
    assert recommended_renderer_name("acme/never-heard-of-it", qwen_tokenizer) == "chat_template"
    assert recommended_renderer_name("acme/never-heard-of-it", plain_tokenizer) == "role_colon"
    assert recommended_renderer_name("/some/local/dir") == "role_colon"


def test_renderer_for_model_never_rejects_a_model(qwen_tokenizer, plain_tokenizer):
    # A Llama name on a tokenizer without Llama's special tokens: falls back instead of failing.
    assert renderer_for_model("meta-llama/Llama-3.1-8B-Instruct", qwen_tokenizer).name == "chat_template"
    assert renderer_for_model("meta-llama/Llama-3.1-8B-Instruct", plain_tokenizer).name == "role_colon"
    assert renderer_for_model("tether/tiny-qwen3", qwen_tokenizer).name == "qwen3_disable_thinking"
    assert (
        renderer_for_model("x", qwen_tokenizer, renderer_name="qwen3_disable_thinking").name
        == "qwen3_disable_thinking"
    )


def test_qwen3_parses_tool_calls_back_into_messages(qwen_tokenizer):
    renderer = get_renderer("qwen3", qwen_tokenizer)
    arguments = '{"city": "Paris", "unit": "celsius"}'
    answer = {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": arguments}}],
    }
    assert renderer.parse_response(_sampled_tokens(renderer, answer)) == (
        answer,
        ParseTermination.STOP_SEQUENCE,
    )


def test_tool_calls_with_bad_arguments_name_the_field(qwen_tokenizer):
    convo = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}],
        },
    ]
    with pytest.raises(UserInputError) as info:
        get_renderer("qwen3", qwen_tokenizer).build_supervised_example(convo)
    assert info.value.field == "messages[1].tool_calls[0].function.arguments"
