"""Tokenizers for renderer tests, all built offline: the default model's, Llama-3-style ones, and
BPE tokenizers with real merges (trained here in a second) carrying the Qwen3 or Llama 3 special
tokens, so token boundaries between pieces matter as they do with real models."""

from __future__ import annotations

import pytest

LLAMA3_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)


def _byte_level_tokenizer(special_tokens: list[str], *, eos: str, bos: str | None, template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tether.engine.default_model import _byte_of_bytelevel_char

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of_bytelevel_char)
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=eos,
        bos_token=bos,
        additional_special_tokens=[t for t in special_tokens if t not in (eos, bos)],
        clean_up_tokenization_spaces=False,
    )
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The embedded default model's tokenizer: bytes 0..255, then <|endoftext|>, <|im_start|>, ..."""
    from tether.engine.default_model import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def llama_tokenizer():
    """Byte-level tokenizer with the Llama 3 special tokens (ids 256..) and a Llama-3-style template."""
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    return _byte_level_tokenizer(
        specials, eos="<|eot_id|>", bos="<|begin_of_text|>", template=LLAMA3_TEMPLATE
    )


@pytest.fixture(scope="session")
def plain_tokenizer():
    """Byte-level tokenizer with no chat template and only an end-of-text token."""
    return _byte_level_tokenizer(["<|end_of_text|>"], eos="<|end_of_text|>", bos=None, template=None)


QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN3_PLAIN_ADDED = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]
LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

_CORPUS = [
    "You are a helpful assistant. Answer briefly and exactly.",
    "What is the weather in Paris today? It is sunny, 21 degrees.",
    "Let me think about it step by step: first add the tens, then the units.",
    "System: user: assistant: tool: The answer is 42.\n\nUser: thanks!",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "héllo wörld, ünïcode ✓ and numbers 12+34=46, 2+2=4.",
    "def add(a, b):\n    return a + b\n",
]


def _trained_bpe_tokenizer(special: list[str], plain_added: list[str], **named):
    """A byte-level BPE with merges learnt from a small corpus, special tokens added after training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS * 3, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        additional_special_tokens=[t for t in special if t not in named.values()],
        clean_up_tokenization_spaces=False,
        **named,
    )
    tokenizer.add_tokens(plain_added)
    return tokenizer


@pytest.fixture(scope="session")
def qwen_bpe_tokenizer():
    """Merging BPE with Qwen3's special tokens (im_start/im_end special, think/tool tags plain added)."""
    from tether.engine.default_model import CHAT_TEMPLATE

    tokenizer = _trained_bpe_tokenizer(QWEN3_SPECIAL, QWEN3_PLAIN_ADDED, eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>")  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def llama_bpe_tokenizer():
    """Merging BPE with the Llama 3 special tokens and a Llama-3-style template."""
    tokenizer = _trained_bpe_tokenizer(
        LLAMA3_SPECIAL, [], bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer
