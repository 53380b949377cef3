"""Llama 3 chat format: `<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`.

Like the tinker-cookbook, it leaves out the "Cutting Knowledge Date" system preamble that the
Hugging Face template inserts, so a conversation renders the same whatever the date. Tokens and
weights equal tinker-cookbook 0.6.1's `llama3`. Llama 3 has no tool-call format this renderer can
write (the cookbook drops `tool_calls` silently); messages with tool calls, and roles other than
system, user and assistant, are refused.
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
    special_token_id,
)


class Llama3Renderer(Renderer):
    name = "llama3"

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.bos_id = require_special_token(tokenizer, "<|begin_of_text|>", self.name)
        self.eot_id = require_special_token(tokenizer, "<|eot_id|>", self.name)
        require_special_token(tokenizer, "<|start_header_id|>", self.name)
        require_special_token(tokenizer, "<|end_header_id|>", self.name)
        self.end_of_text_id = special_token_id(tokenizer, "<|end_of_text|>")

    def bos_tokens(self) -> list[int]:
        return [self.bos_id]

    def _header(self, role: str) -> list[int]:
        return encode_text(self.tokenizer, f"<|start_header_id|>{role}<|end_header_id|>\n\n")

    def render_message(self, index: int, message: Message, messages: list[Message]) -> RenderedMessage:
        return RenderedMessage(
            header=self._header(message["role"]),
            output=encode_text(self.tokenizer, message["content"]) + [self.eot_id],
        )

    def generation_suffix(self, role: str, messages: list[Message]) -> list[int]:
        return self._header(role)

    def get_stop_sequences(self) -> list[int]:
        return [self.eot_id]

    def parse_response(self, tokens: Sequence[int]) -> tuple[Message, ParseTermination]:
        text, termination = parse_until_stop_token(self.tokenizer, tokens, [self.eot_id], self.end_of_text_id)
        return {"role": "assistant", "content": text}, termination
