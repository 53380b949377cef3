"""The plain-text format for base models: "User: hi\\n\\nAssistant: hello\\n\\nUser: ...".

It needs no special tokens, so it works with any tokenizer. Sampling stops at the text
"\\n\\nUser:"; a trained final assistant message therefore ends with that whole string (its "User:"
part is the `stop_overlap`), so the model learns to hand the turn back. Any role is written as its
own name ("Tool: ..."); tool calls have no format here and are refused.

Tokens and weights equal tinker-cookbook 0.6.1's `role_colon`, except that a conversation ending
in a non-assistant message gets no stop overlap (the cookbook appends the literal text
"<UNUSED>" there).
"""

from __future__ import annotations

from collections.abc import Sequence

from tether.renderers.base import Message, ParseTermination, RenderedMessage, Renderer, encode_text

STOP_TEXT = "\n\nUser:"


class RoleColonRenderer(Renderer):
    name = "role_colon"
    roles = None

    def bos_tokens(self) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return [int(bos)] if bos is not None else []

    def render_message(self, index: int, message: Message, messages: list[Message]) -> RenderedMessage:
        return RenderedMessage(
            header=encode_text(self.tokenizer, f"{message['role'].capitalize()}:"),
            output=encode_text(self.tokenizer, f" {message['content']}\n\n"),
            stop_overlap=encode_text(self.tokenizer, "User:"),
        )

    def generation_suffix(self, role: str, messages: list[Message]) -> list[int]:
        return encode_text(self.tokenizer, f"{role.capitalize()}:")

    def get_stop_sequences(self) -> list[str]:
        return [STOP_TEXT]

    def parse_response(self, tokens: Sequence[int]) -> tuple[Message, ParseTermination]:
        tokens = [int(t) for t in tokens]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        ended_by_eos = bool(tokens) and eos is not None and tokens[-1] == eos
        text = self.tokenizer.decode(tokens[:-1] if ended_by_eos else tokens, skip_special_tokens=False)
        if STOP_TEXT in text:
            content, _, rest = text.partition(STOP_TEXT)
            termination = ParseTermination.STOP_SEQUENCE if not rest.strip() else ParseTermination.MALFORMED
        elif ended_by_eos:
            content, termination = text, ParseTermination.EOS
        else:
            content, termination = text, ParseTermination.MALFORMED
        return {"role": "assistant", "content": content.strip()}, termination
