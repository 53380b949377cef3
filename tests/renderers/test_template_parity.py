"""Renderers agree with the tokenizer's own chat template (Hugging Face `apply_chat_template`).

Generation prompts must match token for token. Supervised examples are compared as text, minus the
template's trailing newline after the final end-of-turn token, which a trained turn deliberately
leaves out (sampling stops at the end-of-turn token).
"""

from __future__ import annotations

import pytest

from tether.renderers import get_renderer

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
