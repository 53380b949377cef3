"""Tokenizers for renderer tests, all built offline: the default model's, and a Llama-3-style one."""

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
