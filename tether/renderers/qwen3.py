"""Qwen3 chat format: `<|im_start|>role\\ncontent<|im_end|>`, with `<think>` reasoning blocks.

`qwen3` lets the model decide whether to think: the generation prompt ends at
`<|im_start|>assistant\\n`, and reasoning of the current turn (`reasoning_content`) is trained as
`<think>\\n...\\n</think>\\n\\n` before the answer. Reasoning of earlier turns is dropped, as the
Qwen3 template does. `qwen3_disable_thinking` puts an empty think block into the prompt instead
(`enable_thinking=False` in the Hugging Face template) and rejects reasoning in trained turns.

The newline between turns opens the next header rather than closing the previous output, so a
trained turn ends exactly at `<|im_end|>`, the token sampling stops at.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tether.renderers.base import (
    Message,
    ParseTermination,
    RenderedMessage,
    Renderer,
    encode_text,
    parse_until_stop_token,
    require_special_token,
)
from tether.types.errors import UserInputError

EMPTY_THINK_BLOCK = "<think>\n\n</think>\n\n"


def _last_user_index(messages: list[Message]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)


def _strip_history_thinking(content: str) -> str:
    if "</think>" in content:
        return content.split("</think>")[-1].lstrip("\n")
    return content


def split_thinking(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a response that may start with a `<think>...</think>` block."""
    if "</think>" not in text:
        return None, text
    before, _, after = text.partition("</think>")
    reasoning = before.split("<think>", 1)[-1].strip("\n")
    return reasoning, after.lstrip("\n")


class Qwen3Renderer(Renderer):
    """Qwen3 with thinking left to the model."""

    name = "qwen3"
    disables_thinking = False

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.im_end_id = require_special_token(tokenizer, "<|im_end|>", self.name)
        require_special_token(tokenizer, "<|im_start|>", self.name)

    def _header_text(self, index: int, role: str) -> str:
        return ("\n" if index > 0 else "") + f"<|im_start|>{role}\n"

    def render_message(self, index: int, message: Message, messages: list[Message]) -> RenderedMessage:
        header = self._header_text(index, message["role"])
        content = message["content"]
        current_turn = index > _last_user_index(messages)
        if message["role"] == "assistant":
            reasoning = message.get("reasoning_content")
            if not current_turn:
                content = _strip_history_thinking(content)
            elif self.disables_thinking:
                if reasoning:
                    raise UserInputError(
                        f"{self.name!r} trains without thinking; drop the reasoning or use 'qwen3'",
                        field=f"messages[{index}].reasoning_content",
                    )
                header += EMPTY_THINK_BLOCK
            elif reasoning:
                content = f"<think>\n{reasoning}\n</think>\n\n{content}"
        return RenderedMessage(
            header=encode_text(self.tokenizer, header),
            output=encode_text(self.tokenizer, content) + [self.im_end_id],
        )

    def generation_suffix(self, role: str, num_messages: int) -> list[int]:
        text = self._header_text(num_messages, role)
        if self.disables_thinking and role == "assistant":
            text += EMPTY_THINK_BLOCK
        return encode_text(self.tokenizer, text)

    def get_stop_sequences(self) -> list[int]:
        return [self.im_end_id]

    def parse_response(self, tokens: Sequence[int]) -> tuple[Message, ParseTermination]:
        text, termination = parse_until_stop_token(self.tokenizer, tokens, [self.im_end_id], None)
        reasoning, content = split_thinking(text)
        message: Message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return message, termination


class Qwen3DisableThinkingRenderer(Qwen3Renderer):
    """Qwen3 with an empty think block in the prompt, so the model answers directly."""

    name = "qwen3_disable_thinking"
    disables_thinking = True
