"""The embedded default model: a tiny Qwen3-architecture causal LM that needs no download.

It is generated deterministically (fixed config, fixed seed) and saved once, atomically, into a cache
directory in standard Hugging Face format (config.json, model.safetensors, tokenizer files). From
there it is loaded through the same code path as any other local model, so tests and the quickstart
exercise the real loading code.

The tokenizer is byte-level (every UTF-8 byte is one token, so any text round-trips and digits are
single tokens) plus the chat special tokens of the Qwen family, and it carries a Qwen3-style chat
template so chat renderers work on it.

This module knows nothing about training or serving; it only makes the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "tether/tiny-qwen3"
"""The name clients use for the embedded default model."""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
THINK_TOKENS = ("<think>", "</think>")

MODEL_CONFIG: dict[str, Any] = {
    "vocab_size": 264,  # 256 bytes + 5 special tokens, padded to a multiple of 8
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
}
GENERATION_SEED = 1234

# The Qwen3 template's rules, written out for this model: reasoning (`reasoning_content`, or a leading
# `<think>...</think>` in the content) is kept only on assistant turns after the last user message,
# and the final turn there is always framed with a think block (empty when it did not reason);
# tool calls are `<tool_call>` JSON blocks; consecutive tool results share one user turn.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_query=messages|length - 1) -%}"
    "{%- for message in messages -%}{%- if message.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- set content = message.content if message.content is string else '' -%}"
    "{%- if message.role in ['system', 'user'] -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{%- set reasoning = '' -%}"
    "{%- if message.reasoning_content is string -%}{%- set reasoning = message.reasoning_content -%}"
    "{%- elif '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') -}}"
    "{%- else -%}{{- '<|im_start|>assistant\\n' + content -}}{%- endif -%}"
    "{%- for call in message.tool_calls or [] -%}"
    "{%- if (loop.first and content) or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{%- set call = call.function if call.function else call -%}"
    '{{- \'<tool_call>\\n{"name": "\' + call.name + \'", "arguments": \' -}}'
    "{{- call.arguments if call.arguments is string else call.arguments | tojson -}}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def _fingerprint() -> str:
    payload = json.dumps(
        {
            "config": MODEL_CONFIG,
            "seed": GENERATION_SEED,
            "special": SPECIAL_TOKENS,
            "template": CHAT_TEMPLATE,
            "plain_added": THINK_TOKENS,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """Where generated models live: `$TETHER_CACHE_DIR`, else `~/.cache/tether`."""
    root = os.environ.get("TETHER_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "tether"


def build_tokenizer():
    """A byte-level fast tokenizer with chat special tokens and a chat template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = sorted(alphabet, key=lambda ch: _byte_of_bytelevel_char(ch))
    vocab = {ch: i for i, ch in enumerate(byte_to_char)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[
            t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>", *THINK_TOKENS)
        ],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens(list(THINK_TOKENS))  # added but not special, as in Qwen3: content may spell them
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = MODEL_CONFIG["max_position_embeddings"]
    return tokenizer


def _byte_of_bytelevel_char(ch: str) -> int:
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + k in order.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def build_model(tokenizer):
    """The tiny Qwen3 model, initialised deterministically from `GENERATION_SEED`."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        **MODEL_CONFIG,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    if len(tokenizer) > config.vocab_size:
        raise AssertionError(
            f"tokenizer has {len(tokenizer)} tokens, more than vocab_size {config.vocab_size}"
        )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(GENERATION_SEED)
        model = Qwen3ForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def ensure_default_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the directory of the default model, generating it first if it is not there yet.

    The directory name carries a fingerprint of the config, so a changed config makes a new
    directory instead of silently reusing stale files. Writing goes to a temporary directory that is
    renamed into place, so a crash never leaves a half-written model behind.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "models" / f"tiny-qwen3-{_fingerprint()}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-qwen3-", dir=target.parent))
    try:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race with another process: theirs is fine
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
