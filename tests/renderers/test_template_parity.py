"""Renderers agree with the tokenizer's own chat template (Hugging Face `apply_chat_template`).

Generation prompts must match token for token. Supervised examples are compared as text, minus the
template's trailing newline after the final end-of-turn token, which a trained turn deliberately
leaves out (sampling stops at the end-of-turn token).
"""

from __future__ import annotations

import pytest
from conversation_suite import CONVERSATIONS as SUITE

from tether.renderers import get_renderer
from tether.types.errors import UserInputError

CONVERSATIONS = [
    [{"role": "user", "content": "12+34"}, {"role": "assistant", "content": "46"}],
    [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "héllo\nworld"},
        {"role": "assistant", "content": "multi\nline ✓"},
    ],
    [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nold answer"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ],
]


def _hf_prompt(tokenizer, messages, **kwargs):
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs))


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"]) if hasattr(encoded, "keys") else list(encoded)


@pytest.mark.parametrize("convo", CONVERSATIONS)
@pytest.mark.parametrize(
    ("renderer_name", "hf_kwargs"),
    [("qwen3", {}), ("qwen3_disable_thinking", {"enable_thinking": False}), ("chat_template", {})],
)
def test_generation_prompt_matches_the_default_tokenizers_template(
    qwen_tokenizer, convo, renderer_name, hf_kwargs
):
    renderer = get_renderer(renderer_name, qwen_tokenizer)
    for end in range(1, len(convo) + 1):
        if convo[end - 1]["role"] != "user":
            continue
        history = convo[:end]
        expected = _ids(qwen_tokenizer.apply_chat_template(history, add_generation_prompt=True, **hf_kwargs))
        assert renderer.build_generation_prompt(history).to_ints() == expected


@pytest.mark.parametrize("convo", CONVERSATIONS)
@pytest.mark.parametrize("renderer_name", ["qwen3", "chat_template"])
def test_supervised_example_matches_the_default_tokenizers_template(qwen_tokenizer, convo, renderer_name):
    tokens, weights = get_renderer(renderer_name, qwen_tokenizer).build_supervised_example(convo)
    expected = qwen_tokenizer.apply_chat_template(convo, tokenize=False).removesuffix("\n")
    assert qwen_tokenizer.decode(tokens.to_ints()) == expected
    assert len(weights) == tokens.length


@pytest.mark.parametrize("convo", CONVERSATIONS[:2])
def test_llama3_and_template_renderers_match_a_llama_style_template(llama_tokenizer, convo):
    for renderer_name in ("llama3", "chat_template"):
        renderer = get_renderer(renderer_name, llama_tokenizer)
        expected = _ids(llama_tokenizer.apply_chat_template(convo[:-1], add_generation_prompt=True))
        assert renderer.build_generation_prompt(convo[:-1]).to_ints() == expected
        tokens, _ = renderer.build_supervised_example(convo)
        assert llama_tokenizer.decode(tokens.to_ints()) == llama_tokenizer.apply_chat_template(
            convo, tokenize=False
        )


def test_template_renderer_weights_match_the_hand_written_renderer(qwen_tokenizer, llama_tokenizer):
    """Built only from the template, it finds the same headers, outputs and stop tokens."""
    for tokenizer, family in ((qwen_tokenizer, "qwen3"), (llama_tokenizer, "llama3")):
        generic, hand_written = get_renderer("chat_template", tokenizer), get_renderer(family, tokenizer)
        assert generic.get_stop_sequences()[0] == hand_written.get_stop_sequences()[0]
        for mode in ("all_assistant_messages", "all_messages", "last_assistant_message"):
            generic_tokens, generic_weights = generic.build_supervised_example(CONVERSATIONS[1], mode)
            tokens, weights = hand_written.build_supervised_example(CONVERSATIONS[1], mode)
            assert (generic_tokens.to_ints(), generic_weights) == (tokens.to_ints(), weights)


def test_one_letter_messages_do_not_cut_into_the_role_headers(qwen_tokenizer):
    """ "u" occurs in "<|im_start|>user": boundaries come from tokens, so the header stays whole."""
    convo = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    generic = get_renderer("chat_template", qwen_tokenizer)
    tokens, weights = generic.build_supervised_example(convo, "all_user_and_system_messages")
    trained = [t for t, w in zip(tokens.to_ints(), weights, strict=True) if w]
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert trained == [ord("s"), im_end, ord("u"), im_end]
    for mode in ("all_messages", "all_tokens", "last_assistant_message"):
        assert generic.build_supervised_example(convo, mode) == get_renderer(
            "qwen3", qwen_tokenizer
        ).build_supervised_example(convo, mode)


def test_template_renderer_refuses_a_message_the_template_drops(qwen_tokenizer):
    convo = [{"role": "user", "content": "guess"}, {"role": "player", "content": "7"}]
    with pytest.raises(UserInputError) as info:
        get_renderer("chat_template", qwen_tokenizer).build_supervised_example(convo, "all_messages")
    assert info.value.field == "messages[1]"


@pytest.mark.parametrize(
    "name",
    ["one_turn", "system_multi_turn", "reasoning_now", "reasoning_in_history", "inline_think_in_history",
     "tool_call", "final_tool_call", "consecutive_assistants", "one_letter_messages"],
)  # fmt: skip
@pytest.mark.parametrize("tokenizer_fixture", ["qwen_tokenizer", "qwen_bpe_tokenizer"])
def test_template_renderer_equals_the_template_and_qwen3(request, tokenizer_fixture, name):
    """On the Qwen3-rule template, the generic renderer writes what the template writes, token for
    token, and trains what the hand-written qwen3 renderer trains."""
    tokenizer, convo = request.getfixturevalue(tokenizer_fixture), SUITE[name]
    generic, qwen3 = get_renderer("chat_template", tokenizer), get_renderer("qwen3", tokenizer)
    tokens, _ = generic.build_supervised_example(convo)
    expected = _ids(tokenizer.apply_chat_template(convo, tokenize=True))
    assert tokens.to_ints() == expected[: len(tokens.to_ints())]
    assert tokenizer.decode(expected[len(tokens.to_ints()) :]) == "\n"
    for mode in ("last_assistant_message", "last_assistant_turn", "all_assistant_messages"):
        assert generic.build_supervised_example(convo, mode) == qwen3.build_supervised_example(convo, mode), (
            mode
        )


def test_where_the_cookbooks_qwen3_differs_from_the_qwen3_template(qwen_tokenizer):
    """qwen3 follows tinker-cookbook 0.6.1; these are the known differences from the Qwen3 template
    (pinned here so a change on either side is noticed)."""
    qwen3 = get_renderer("qwen3", qwen_tokenizer)

    def ours(convo):
        return qwen_tokenizer.decode(qwen3.build_supervised_example(convo)[0].to_ints())

    def template(convo):
        return qwen_tokenizer.apply_chat_template(convo, tokenize=False).removesuffix("\n")

    convo = SUITE["reasoning_then_tool_call"]  # one more newline before the call
    assert ours(convo) == template(convo).replace("</think>\n\n<tool_call>", "</think>\n\n\n<tool_call>")
    convo = SUITE["tool_calls_with_text_and_reasoning"]  # one user block per tool result
    assert ours(convo) == template(convo).replace(
        "</tool_response>\n<tool_response>", "</tool_response><|im_end|>\n<|im_start|>user\n<tool_response>"
    )
