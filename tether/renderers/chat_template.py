"""A renderer backed by the tokenizer's own Jinja chat template, for models no hand-written format knows.

The generation prompt is the template's output itself, so it matches `apply_chat_template` token
for token. Supervised examples are cut from the template's renderings of growing prefixes of the
conversation: message i is what rendering messages[:i+1] adds to rendering messages[:i]. Within an
assistant message, what the template's generation prompt would have supplied is the untrained
header. Text after the end-of-turn token (usually a newline) is moved to the next header, so a
trained turn ends exactly where sampling stops. Templates whose renderings are not prefixes of one
another (some rewrite history) cannot be split this way and are refused with a clear error.
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
    special_token_id,
    validate_messages,
)
from tether.types.data import EncodedTextChunk, ModelInput
from tether.types.errors import UserInputError

_PROBE = "\x00probe\x00"


class ChatTemplateRenderer(Renderer):
    """Any tokenizer with a `chat_template`; `template_kwargs` go to every template call."""

    name = "chat_template"

    def __init__(self, tokenizer: Any, **template_kwargs: Any) -> None:
        super().__init__(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise UserInputError("this tokenizer has no chat_template", field="renderer_name")
        self.template_kwargs = template_kwargs
        self.end_of_turn_text, self.stop_ids = self._find_end_of_turn()

    def _render_text(self, messages: list[Message], *, add_generation_prompt: bool = False) -> str:
        if not messages and not add_generation_prompt:
            return ""
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        return self.tokenizer.apply_chat_template(
            plain, tokenize=False, add_generation_prompt=add_generation_prompt, **self.template_kwargs
        )

    def _find_end_of_turn(self) -> tuple[str, list[int]]:
        """The special token the template closes an assistant turn with, found by rendering a probe."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        text = self._render_text(probe)  # type: ignore[arg-type]
        after = text.split(_PROBE, 1)[-1].strip() if _PROBE in text else ""
        stops: list[int] = []
        end_text = ""
        for candidate in [after, getattr(self.tokenizer, "eos_token", None)]:
            if not candidate:
                continue
            token_id = special_token_id(self.tokenizer, candidate)
            if token_id is not None and token_id not in stops:
                stops.append(token_id)
                end_text = end_text or candidate
        if not stops:
            raise UserInputError("cannot tell how this chat template ends a turn", field="renderer_name")
        return end_text, stops

    def render_conversation(self, messages: list[Message]) -> list[RenderedMessage]:
        rendered: list[RenderedMessage] = []
        carry = ""
        previous = ""
        for index, message in enumerate(messages):
            current = self._render_text(messages[: index + 1])
            if not current.startswith(previous):
                raise UserInputError(
                    "the chat template rewrites earlier messages, so it cannot be split into trained spans;"
                    " use a hand-written renderer",
                    field=f"messages[{index}]",
                )
            span = current[len(previous) :]
            previous = current
            header_text = self._header_of(index, message, messages, span)
            output_text = span[len(header_text) :]
            cut = output_text.rfind(self.end_of_turn_text)
            trailing = output_text[cut + len(self.end_of_turn_text) :] if cut >= 0 else ""
            output_text = output_text[: len(output_text) - len(trailing)]
            rendered.append(
                RenderedMessage(
                    header=encode_text(self.tokenizer, carry + header_text),
                    output=encode_text(self.tokenizer, output_text),
                )
            )
            carry = trailing
        return rendered

    def _header_of(self, index: int, message: Message, messages: list[Message], span: str) -> str:
        if message["role"] == "assistant":
            before = self._render_text(messages[:index])
            prompted = self._render_text(messages[:index], add_generation_prompt=True)
            header = prompted[len(before) :] if prompted.startswith(before) else ""
            if header and span.startswith(header):
                return header
        content = message["content"]
        position = span.find(content) if content else -1
        return span[:position] if position >= 0 else ""

    def build_generation_prompt(
        self, messages: Sequence[Message], role: str = "assistant", prefill: str | None = None
    ) -> ModelInput:
        checked = validate_messages(messages)
        if role != "assistant":
            raise UserInputError("a chat template can only prompt for the assistant", field="role")
        tokens = encode_text(self.tokenizer, self._render_text(checked, add_generation_prompt=True))
        if prefill:
            tokens += encode_text(self.tokenizer, prefill)
        return ModelInput(chunks=[EncodedTextChunk(tokens=tokens)] if tokens else [])

    def generation_suffix(self, role: str, num_messages: int) -> list[int]:
        raise NotImplementedError("ChatTemplateRenderer renders whole prompts through the template")

    def get_stop_sequences(self) -> list[int]:
        return list(self.stop_ids)

    def parse_response(self, tokens: Sequence[int]) -> tuple[Message, ParseTermination]:
        text, termination = parse_until_stop_token(self.tokenizer, tokens, self.stop_ids, None)
        return {"role": "assistant", "content": text}, termination
