"""Token and weight layouts of each renderer on fixed conversations, spelled out token by token.

The byte-level test tokenizers make every expected sequence readable: text is its UTF-8 bytes and
each special token is one id.
"""

from __future__ import annotations

import pytest

from tether.renderers import TrainOnWhat, get_renderer
from tether.types.errors import UserInputError

IM_START, IM_END = 258, 256  # default tokenizer: <|im_start|>, <|im_end|>
THINK, END_THINK = 259, 260
EMPTY_THINK = [THINK] + list(b"\n\n") + [END_THINK] + list(b"\n\n")


def b(text: str) -> list[int]:
    return list(text.encode())


CONVO = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "1+2"},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "2+2"},
    {"role": "assistant", "content": "4"},
]


def qwen_pieces():
    """(tokens, message index or None for headers) of CONVO under qwen3, in order."""
    return [
        ([IM_START] + b("system\n"), None), (b("S") + [IM_END], 0),
        (b("\n") + [IM_START] + b("user\n"), None), (b("1+2") + [IM_END], 1),
        (b("\n") + [IM_START] + b("assistant\n"), None), (b("3") + [IM_END], 2),
        (b("\n") + [IM_START] + b("user\n"), None), (b("2+2") + [IM_END], 3),
        (b("\n") + [IM_START] + b("assistant\n"), None), (EMPTY_THINK + b("4") + [IM_END], 4),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("train_on_what", "trained_messages", "headers_trained"),
    [
        (TrainOnWhat.LAST_ASSISTANT_MESSAGE, {4}, False),
        (TrainOnWhat.LAST_ASSISTANT_TURN, {4}, False),
        (TrainOnWhat.ALL_ASSISTANT_MESSAGES, {2, 4}, False),
        (TrainOnWhat.ALL_MESSAGES, {0, 1, 2, 3, 4}, False),
        (TrainOnWhat.ALL_TOKENS, {0, 1, 2, 3, 4}, True),
        (TrainOnWhat.ALL_USER_AND_SYSTEM_MESSAGES, {0, 1, 3}, False),
    ],
)
def test_qwen3_layout_for_every_train_on_what(
    qwen_tokenizer, train_on_what, trained_messages, headers_trained
):
    model_input, weights = get_renderer("qwen3", qwen_tokenizer).build_supervised_example(
        CONVO, train_on_what
    )
    expected_tokens, expected_weights = [], []
    for tokens, message_index in qwen_pieces():
        trained = headers_trained if message_index is None else message_index in trained_messages
        expected_tokens += tokens
        expected_weights += [1.0 if trained else 0.0] * len(tokens)
    assert model_input.to_ints() == expected_tokens
    assert weights == expected_weights


def test_last_assistant_turn_covers_consecutive_assistant_messages(qwen_tokenizer):
    convo = [*CONVO[:4], {"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"}]
    renderer = get_renderer("qwen3", qwen_tokenizer)
    tokens, weights = renderer.build_supervised_example(convo, "last_assistant_turn")
    trained = [t for t, w in zip(tokens.to_ints(), weights, strict=True) if w]
    assert trained == b("A") + [IM_END] + EMPTY_THINK + b("B") + [IM_END]  # only the final turn is framed
    _, last_only = renderer.build_supervised_example(convo, "last_assistant_message")
    assert sum(last_only) == len(EMPTY_THINK) + 2  # the empty think block, "B" and <|im_end|>


def test_customized_uses_per_message_trainable_flags(qwen_tokenizer):
    convo = [
        {"role": "user", "content": "x", "trainable": True},
        {"role": "assistant", "content": "y", "trainable": False},
    ]
    tokens, weights = get_renderer("qwen3", qwen_tokenizer).build_supervised_example(convo, "customized")
    trained = [t for t, w in zip(tokens.to_ints(), weights, strict=True) if w]
    assert trained == b("x") + [IM_END]


def test_qwen3_thinking_is_trained_in_the_current_turn_and_dropped_from_history(qwen_tokenizer):
    convo = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "old"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2", "reasoning_content": "new"},
    ]
    tokens, weights = get_renderer("qwen3", qwen_tokenizer).build_supervised_example(convo)
    text = qwen_tokenizer.decode(tokens.to_ints())
    assert "old" not in text
    trained = [t for t, w in zip(tokens.to_ints(), weights, strict=True) if w]
    assert trained == [259] + b("\nnew\n") + [260] + b("\n\na2") + [IM_END]  # <think>, </think>


def test_qwen3_disable_thinking_puts_the_empty_think_block_in_the_untrained_header(qwen_tokenizer):
    renderer = get_renderer("qwen3_disable_thinking", qwen_tokenizer)
    tokens, weights = renderer.build_supervised_example(CONVO[:3])
    expected = [IM_START] + b("system\nS") + [IM_END] + b("\n") + [IM_START] + b("user\n1+2") + [IM_END]
    header = b("\n") + [IM_START] + b("assistant\n") + [259] + b("\n\n") + [260] + b("\n\n")
    assert tokens.to_ints() == expected + header + b("3") + [IM_END]
    assert weights == [0.0] * (len(expected) + len(header)) + [1.0, 1.0]
    prompt = renderer.build_generation_prompt(CONVO[:2]).to_ints()
    assert prompt == expected + header


def test_qwen3_disable_thinking_rejects_reasoning_in_a_trained_turn(qwen_tokenizer):
    convo = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning_content": "r"},
    ]
    with pytest.raises(UserInputError) as info:
        get_renderer("qwen3_disable_thinking", qwen_tokenizer).build_supervised_example(convo)
    assert info.value.field == "messages[1]"


def test_role_colon_layout_matches_the_cookbook(qwen_tokenizer):
    renderer = get_renderer("role_colon", qwen_tokenizer)
    convo = [
        {"role": "system", "content": "system"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    prompt = renderer.build_generation_prompt(convo).to_ints()
    assert (
        bytes(prompt)
        == b"System: system\n\nUser: hello there\n\nAssistant: Hi!\n\nUser: What is 2+2?\n\nAssistant:"
    )
    tokens, weights = renderer.build_supervised_example([*convo, {"role": "assistant", "content": "4"}])
    assert tokens.to_ints() == prompt + b(" 4\n\nUser:")
    assert weights == [0.0] * len(prompt) + [1.0] * len(" 4\n\nUser:")
    assert renderer.get_stop_sequences() == ["\n\nUser:"]


def test_llama3_layout(llama_tokenizer):
    ids = {t: llama_tokenizer.convert_tokens_to_ids(t) for t in ["<|begin_of_text|>", "<|start_header_id|>",
                                                                 "<|end_header_id|>", "<|eot_id|>"]}  # fmt: skip
    bos, sh, eh, eot = ids.values()
    renderer = get_renderer("llama3", llama_tokenizer)
    tokens, weights = renderer.build_supervised_example(CONVO[1:3])
    prompt = [bos, sh] + b("user") + [eh] + b("\n\n1+2") + [eot, sh] + b("assistant") + [eh] + b("\n\n")
    assert tokens.to_ints() == prompt + b("3") + [eot]
    assert weights == [0.0] * len(prompt) + [1.0, 1.0]
    assert renderer.build_generation_prompt(CONVO[1:2]).to_ints() == prompt
    assert renderer.get_stop_sequences() == [eot]


def test_llama3_needs_its_special_tokens(qwen_tokenizer):
    with pytest.raises(UserInputError) as info:
        get_renderer("llama3", qwen_tokenizer)
    assert info.value.field == "renderer_name"


def test_prefill_is_appended_to_the_generation_prompt(qwen_tokenizer):
    renderer = get_renderer("qwen3", qwen_tokenizer)
    plain = renderer.build_generation_prompt(CONVO[:2]).to_ints()
    assert renderer.build_generation_prompt(CONVO[:2], prefill="<think>").to_ints() == plain + [259]


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], "messages[1].role"),
        ([{"role": "user", "content": "a"}, "oops"], "messages[1]"),
        ([{"role": "user", "content": "a", "trainable": "yes"}], "messages[0].trainable"),
        ("not a list", "messages"),
    ],
)
def test_malformed_messages_name_the_field(qwen_tokenizer, messages, field):
    with pytest.raises(UserInputError) as info:
        get_renderer("qwen3", qwen_tokenizer).build_supervised_example(messages)
    assert info.value.field == field


def test_customized_without_flags_and_unknown_mode_are_user_errors(qwen_tokenizer):
    renderer = get_renderer("qwen3", qwen_tokenizer)
    with pytest.raises(UserInputError) as info:
        renderer.build_supervised_example(CONVO[1:3], "customized")
    assert info.value.field == "messages[0].trainable"
    with pytest.raises(UserInputError) as info:
        renderer.build_supervised_example(CONVO[1:3], "everything")
    assert info.value.field == "train_on_what"
