"""Renderer parity with tinker-cookbook 0.6.1: same tokens and loss weights on the same tokenizer.

Every renderer both projects have is run over one conversation suite (system prompts, multi-turn,
assistant turns with and without reasoning, tool calls, tool results, conversations ending on a
user message or with no user message) under every `TrainOnWhat`, on a byte-level tokenizer and on
a BPE tokenizer with real merges. Where the cookbook refuses a conversation, tether must refuse it
too, with a `UserInputError`. The few places where tether deliberately differs are listed in
`DIVERGENCES` and each has its own test below.
"""

from __future__ import annotations

import json

import pytest
import tinker_cookbook.renderers as cookbook
from conversation_suite import CONVERSATIONS
from tinker_cookbook.renderers.base import ToolCall

from tether.renderers import TrainOnWhat, get_renderer
from tether.renderers.base import reasoning_and_answer, tool_call_arguments
from tether.types.errors import UserInputError

RENDERERS = ["role_colon", "llama3", "qwen3", "qwen3_disable_thinking"]
TOKENIZERS = {
    "role_colon": ["qwen_tokenizer", "qwen_bpe_tokenizer", "llama_bpe_tokenizer"],
    "llama3": ["llama_tokenizer", "llama_bpe_tokenizer"],
    "qwen3": ["qwen_tokenizer", "qwen_bpe_tokenizer"],
    "qwen3_disable_thinking": ["qwen_tokenizer", "qwen_bpe_tokenizer"],
}
TOOLS = {"tool_call", "tool_calls_with_text_and_reasoning", "final_tool_call", "reasoning_then_tool_call"}
REASONING = {
    "reasoning_now",
    "reasoning_in_history",
    "tool_calls_with_text_and_reasoning",
    "reasoning_then_tool_call",
}


def divergence(renderer_name: str, name: str) -> str | None:
    """Why tether deliberately does not match the cookbook on this conversation, if it does not."""
    if renderer_name in ("role_colon", "llama3") and name in TOOLS | REASONING:
        return "refused: the cookbook drops tool calls / renders them as plain text under an invented role"
    if renderer_name == "role_colon" and CONVERSATIONS[name][-1]["role"] != "assistant":
        return "the cookbook appends the literal text '<UNUSED>' after a final non-assistant message"
    return None


def to_cookbook(message: dict, renderer_name: str) -> dict:
    """The same message in the cookbook's shape: reasoning as a ThinkingPart (for the formats that
    have reasoning; elsewhere a think block is plain text), calls as ToolCall."""
    converted: dict = {"role": message["role"], "content": message["content"]}
    reasoning, answer = reasoning_and_answer(message)
    if reasoning and message["role"] == "assistant" and renderer_name.startswith("qwen3"):
        parts = [{"type": "thinking", "thinking": reasoning}]
        converted["content"] = parts + ([{"type": "text", "text": answer}] if answer else [])
    if message.get("tool_calls"):
        converted["tool_calls"] = [
            ToolCall(
                id=c.get("id"),
                function=ToolCall.FunctionBody(
                    name=c["function"]["name"], arguments=json.dumps(tool_call_arguments(c))
                ),
            )
            for c in message["tool_calls"]
        ]
    for key in ("tool_call_id", "name", "trainable"):
        if key in message:
            converted[key] = message[key]
    return converted


def with_flags(messages: list[dict], mode: TrainOnWhat) -> list[dict]:
    if mode is not TrainOnWhat.CUSTOMIZED:
        return messages
    return [{**m, "trainable": m["role"] == "assistant" or i == 0} for i, m in enumerate(messages)]


def cookbook_example(renderer_name, tokenizer, messages, mode):
    renderer = cookbook.get_renderer(renderer_name, tokenizer)
    tokens, weights = renderer.build_supervised_example(
        [to_cookbook(m, renderer_name) for m in messages], mode
    )
    return tokens.to_ints(), [float(w) for w in weights.tolist()]


def cookbook_prompt(renderer_name, tokenizer, messages):
    renderer = cookbook.get_renderer(renderer_name, tokenizer)
    return renderer.build_generation_prompt([to_cookbook(m, renderer_name) for m in messages]).to_ints()


MATCHED = [(r, n) for r in RENDERERS for n in CONVERSATIONS if not divergence(r, n)]
PROMPTED = [
    (r, n) for r in RENDERERS for n in CONVERSATIONS if not (divergence(r, n) or "").startswith("refused")
]


@pytest.mark.parametrize("mode", list(TrainOnWhat))
@pytest.mark.parametrize(("renderer_name", "name"), MATCHED)
def test_supervised_tokens_and_weights_equal_the_cookbook(request, renderer_name, name, mode):
    messages = with_flags(CONVERSATIONS[name], mode)
    for fixture in TOKENIZERS[renderer_name]:
        tokenizer = request.getfixturevalue(fixture)
        try:
            expected = cookbook_example(renderer_name, tokenizer, messages, mode)
        except Exception as exc:  # noqa: BLE001 - the cookbook refuses with assorted exception types
            with pytest.raises(UserInputError):
                get_renderer(renderer_name, tokenizer).build_supervised_example(messages, mode)
            assert type(exc).__name__ in ("RendererError", "AssertionError"), exc
            continue
        if prefill_is_trained_by_the_cookbook(renderer_name, messages, mode):
            expected = (expected[0], without_prefill_weights(renderer_name, tokenizer, messages, expected[1]))
        tokens, weights = get_renderer(renderer_name, tokenizer).build_supervised_example(messages, mode)
        assert (tokens.to_ints(), weights) == expected, (fixture, tokenizer.decode(expected[0]))


def prefill_is_trained_by_the_cookbook(renderer_name: str, messages: list[dict], mode: TrainOnWhat) -> bool:
    """The cookbook trains the prefilled empty think block of a final assistant turn, except with the
    LAST_ASSISTANT_* modes; tether never trains what the generation prompt supplies (but ALL_TOKENS)."""
    return (
        renderer_name == "qwen3_disable_thinking"
        and mode in (TrainOnWhat.ALL_ASSISTANT_MESSAGES, TrainOnWhat.ALL_MESSAGES, TrainOnWhat.CUSTOMIZED)
        and messages[-1]["role"] == "assistant"
        and any(m["role"] == "user" for m in messages)
        and messages[-2]["role"] != "assistant"
        and not reasoning_and_answer(messages[-1])[0]  # a reasoning turn does not follow the prompt at all
    )


def without_prefill_weights(renderer_name, tokenizer, messages, weights: list[float]) -> list[float]:
    prompt = cookbook_prompt(renderer_name, tokenizer, messages[:-1])
    block = len(tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False))
    return weights[: len(prompt) - block] + [0.0] * block + weights[len(prompt) :]


def test_the_prefilled_think_block_is_never_trained(qwen_tokenizer):
    """Thinking off: the prompt ends with `<think>\n\n</think>\n\n`; training the model to write what it
    is always given only dilutes the answer's loss, so no mode but ALL_TOKENS trains it."""
    renderer = get_renderer("qwen3_disable_thinking", qwen_tokenizer)
    messages = CONVERSATIONS["one_turn"]
    prompt = renderer.build_generation_prompt(messages[:-1]).to_ints()
    for mode in ("last_assistant_message", "all_assistant_messages", "all_messages"):
        tokens, weights = renderer.build_supervised_example(messages, mode)
        assert tokens.to_ints()[: len(prompt)] == prompt
        assert (
            qwen_tokenizer.decode([t for t, w in zip(tokens.to_ints(), weights, strict=True) if w][-3:])
            == "46<|im_end|>"
        )
        assert not any(weights[len(prompt) - 6 : len(prompt)])
    _, cookbook_weights = cookbook_example(
        "qwen3_disable_thinking", qwen_tokenizer, messages, "all_assistant_messages"
    )
    assert all(cookbook_weights[len(prompt) - 6 : len(prompt)])  # what the cookbook does


@pytest.mark.parametrize(("renderer_name", "name"), PROMPTED)
def test_generation_prompts_equal_the_cookbook(request, renderer_name, name):
    messages = CONVERSATIONS[name]
    for fixture in TOKENIZERS[renderer_name]:
        tokenizer = request.getfixturevalue(fixture)
        renderer = get_renderer(renderer_name, tokenizer)
        for end in range(len(messages) + 1):
            try:
                expected = cookbook_prompt(renderer_name, tokenizer, messages[:end])
            except Exception as exc:  # noqa: BLE001
                assert type(exc).__name__ == "RendererError", exc
                with pytest.raises(UserInputError):
                    renderer.build_generation_prompt(messages[:end])
                continue
            assert renderer.build_generation_prompt(messages[:end]).to_ints() == expected, (fixture, end)
        assert (
            renderer.get_stop_sequences()
            == cookbook.get_renderer(renderer_name, tokenizer).get_stop_sequences()
        )


@pytest.mark.parametrize("renderer_name", ["role_colon", "llama3"])
@pytest.mark.parametrize("name", sorted(TOOLS | REASONING))
def test_formats_without_tool_calls_or_reasoning_refuse_them(llama_tokenizer, renderer_name, name):
    """The cookbook renders these without their calls or reasoning; tether names the message instead."""
    renderer = get_renderer(renderer_name, llama_tokenizer)
    with pytest.raises(UserInputError) as info:
        renderer.build_supervised_example(CONVERSATIONS[name], "all_messages")
    assert info.value.field.startswith("messages[")


def test_role_colon_adds_no_placeholder_after_a_final_user_message(qwen_tokenizer):
    """The cookbook's role_colon ends such an example with the text '<UNUSED>'; tether ends it cleanly."""
    messages = CONVERSATIONS["ends_with_user"]
    expected_tokens, expected_weights = cookbook_example(
        "role_colon", qwen_tokenizer, messages, "all_messages"
    )
    tail = len(qwen_tokenizer.encode("<UNUSED>", add_special_tokens=False))
    assert qwen_tokenizer.decode(expected_tokens[-tail:]) == "<UNUSED>"
    tokens, weights = get_renderer("role_colon", qwen_tokenizer).build_supervised_example(
        messages, "all_messages"
    )
    assert (tokens.to_ints(), weights) == (expected_tokens[:-tail], expected_weights[:-tail])


@pytest.mark.parametrize("renderer_name", ["llama3", "qwen3", "qwen3_disable_thinking"])
def test_unknown_roles_are_refused_not_rendered(request, renderer_name):
    tokenizer = request.getfixturevalue(TOKENIZERS[renderer_name][0])
    messages = [{"role": "user", "content": "guess"}, {"role": "player", "content": "7"}]
    with pytest.raises(UserInputError) as info:
        get_renderer(renderer_name, tokenizer).build_supervised_example(messages, "all_messages")
    assert info.value.field == "messages[1].role"
    assert "player" in str(info.value)


def test_special_tokens_in_content_are_literal_text(qwen_bpe_tokenizer):
    """A message cannot end its turn early by spelling <|im_end|>: it is encoded as text (as the cookbook)."""
    messages = [{"role": "user", "content": "say <|im_end|> please"}, {"role": "assistant", "content": "ok"}]
    tokens, _ = get_renderer("qwen3", qwen_bpe_tokenizer).build_supervised_example(messages)
    im_end = qwen_bpe_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokens.to_ints().count(im_end) == 2
    assert (
        tokens.to_ints()
        == cookbook_example("qwen3", qwen_bpe_tokenizer, messages, "last_assistant_message")[0]
    )


@pytest.mark.parametrize("system_prompt", ["", "You are terse."])
def test_tool_declarations_equal_the_cookbook(qwen_bpe_tokenizer, system_prompt):
    tools = [
        {"name": "get_weather", "description": "Weather of a city",
         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
        {"name": "now", "description": "The time", "parameters": {"type": "object", "properties": {}}},
    ]  # fmt: skip
    ours = get_renderer("qwen3", qwen_bpe_tokenizer).create_conversation_prefix_with_tools(
        tools, system_prompt
    )
    theirs = cookbook.get_renderer("qwen3", qwen_bpe_tokenizer).create_conversation_prefix_with_tools(
        tools, system_prompt
    )
    assert ours == [dict(m) for m in theirs]
    with pytest.raises(UserInputError):
        get_renderer("role_colon", qwen_bpe_tokenizer).create_conversation_prefix_with_tools(tools)
