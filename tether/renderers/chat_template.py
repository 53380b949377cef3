"""A renderer backed by the tokenizer's own Jinja chat template, for models no hand-written format knows.

The generation prompt is the template's output itself, so it matches `apply_chat_template` token
for token, and so do supervised examples: they are the tokens of the template's rendering of the
whole conversation (up to the final end-of-turn token). Message boundaries are found by tokens,
never by searching for a message's text: the conversation is rendered again with one message's
content replaced by two different probes, and the tokens all three renderings share at the start
and at the end are not that message's content. So a message whose text also occurs in a role
header (a one-letter reply "u" in "<|im_start|>user") cannot move a boundary, and templates that
write a message differently once others follow it (Qwen3 drops reasoning from history) split
correctly.

A message's output runs from its content (for an assistant message: from the end of what the
template's generation prompt adds, so training starts exactly where sampling does) to the first
end-of-turn token after its content; the tokens from there to the next message's content (the
newline after the end-of-turn token, the next role header) are the next message's header.
Refused with a `UserInputError`: messages whose content the template does not write (roles it
does not know), templates that do not write messages in order, and generation prompts for a role
other than assistant.
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
    split_thinking,
)
from tether.types.data import EncodedTextChunk, ModelInput
from tether.types.errors import UserInputError

_PROBES = ("A", "B")


def _common_prefix_length(*sequences: Sequence[int]) -> int:
    length = 0
    for column in zip(*sequences, strict=False):
        if any(value != column[0] for value in column):
            break
        length += 1
    return length


class ChatTemplateRenderer(Renderer):
    """Any tokenizer with a `chat_template`; `template_kwargs` go to every template call."""

    name = "chat_template"
    roles = None
    supports_tool_calls = True
    supports_reasoning = True

    def __init__(self, tokenizer: Any, **template_kwargs: Any) -> None:
        super().__init__(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise UserInputError("this tokenizer has no chat_template", field="renderer_name")
        self.template_kwargs = template_kwargs
        self.stop_ids = self._find_end_of_turn()
        bos = getattr(tokenizer, "bos_token_id", None)
        probe = self._tokens([{"role": "user", "content": "A"}])
        self._bos = [int(bos)] if bos is not None and probe[:1] == [bos] else []

    def _render_text(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        if not messages and not add_generation_prompt:
            return ""
        plain = [{k: v for k, v in m.items() if k != "trainable"} for m in messages]
        return self.tokenizer.apply_chat_template(
            plain, tokenize=False, add_generation_prompt=add_generation_prompt, **self.template_kwargs
        )

    def _tokens(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> list[int]:
        return encode_text(
            self.tokenizer, self._render_text(messages, add_generation_prompt=add_generation_prompt)
        )

    def _find_end_of_turn(self) -> list[int]:
        """The added token that closes an assistant turn (then EOS), found by comparing two renderings."""
        user = {"role": "user", "content": "hi"}
        first, second = (self._tokens([user, {"role": "assistant", "content": c}]) for c in _PROBES)  # type: ignore[list-item]
        added = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        added |= {int(i) for i in (getattr(self.tokenizer, "added_tokens_decoder", None) or {})}
        start = _common_prefix_length(first, second)
        stops = [t for t in first[start:] if t in added][:1]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None and eos not in stops:
            stops.append(int(eos))
        if not stops:
            raise UserInputError("cannot tell how this chat template ends a turn", field="renderer_name")
        return stops

    def bos_tokens(self) -> list[int]:
        return list(self._bos)

    def _full(self, messages: Sequence[Message]) -> list[int]:
        tokens = self._tokens(messages)
        return tokens[len(self._bos) :] if self._bos and tokens[: len(self._bos)] == self._bos else tokens

    def _content_span(self, index: int, messages: list[Message], full: list[int]) -> tuple[int, int]:
        """Where message `index`'s content lies in `full`: [start, end) token positions.

        The conversation is rendered again with that message's content replaced by two probes;
        whatever all three renderings share at the start and at the end is not the content.
        """
        variants = []
        for probe in _PROBES:
            changed = list(messages)
            changed[index] = {**messages[index], "content": probe}
            variants.append(self._full(changed))
        if variants[0] == variants[1]:
            raise UserInputError(
                f"the chat template does not write this message's content (role {messages[index]['role']!r});"
                " it would be dropped silently",
                field=f"messages[{index}]",
            )
        start = _common_prefix_length(full, *variants)
        room = min(len(sequence) for sequence in (full, *variants)) - start
        backwards = [list(reversed(sequence)) for sequence in (full, *variants)]
        end = len(full) - min(_common_prefix_length(*backwards), room)
        return start, end

    def _generation_header(self, index: int, messages: list[Message]) -> list[int]:
        """What the template's generation prompt adds after messages[:index] (empty if it cannot tell)."""
        try:
            plain = self._render_text(messages[:index])
            prompted = self._render_text(messages[:index], add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template may refuse a history (e.g. an empty one)
            return []
        if not prompted.startswith(plain):
            return []
        before, after = encode_text(self.tokenizer, plain), encode_text(self.tokenizer, prompted)
        if after[: len(before)] == before:
            return after[len(before) :]
        return encode_text(self.tokenizer, prompted[len(plain) :])

    def render_conversation(self, messages: list[Message]) -> list[RenderedMessage]:
        """Split the template's rendering of the whole conversation into (header, output) per message.

        Message i's output runs from its content (for an assistant: from the end of the generation
        prompt) to the first end-of-turn token after its content; the tokens from there to the next
        message's content are that message's header.
        """
        if not messages:
            return []
        full = self._full(messages)
        spans = [self._content_span(index, messages, full) for index in range(len(messages))]
        rendered: list[RenderedMessage] = []
        position = 0
        for index, (start, end) in enumerate(spans):
            next_start = spans[index + 1][0] if index + 1 < len(spans) else len(full)
            if start < position or end > next_start:
                raise UserInputError(
                    "the chat template does not write messages in order, so it cannot be split into"
                    " trained spans; use a hand-written renderer",
                    field=f"messages[{index}]",
                )
            header_end = start
            if messages[index]["role"] == "assistant":
                prompt = self._generation_header(index, messages)
                region = full[position:start]
                for offset in range(len(region) - len(prompt) + 1 if prompt else 0):
                    if region[offset : offset + len(prompt)] == prompt:
                        header_end = position + offset + len(prompt)
                        break
            stops = [p for p in range(end, next_start) if full[p] in self.stop_ids]
            output_end = stops[0] + 1 if stops else end
            rendered.append(
                RenderedMessage(header=full[position:header_end], output=full[header_end:output_end])
            )
            position = output_end
        return rendered

    def build_generation_prompt(
        self, messages: Sequence[Message], role: str = "assistant", prefill: str | None = None
    ) -> ModelInput:
        checked = self._checked(messages)
        if role != "assistant":
            raise UserInputError("a chat template can only prompt for the assistant", field="role")
        tokens = self._tokens(checked, add_generation_prompt=True)
        if prefill:
            tokens += encode_text(self.tokenizer, prefill)
        return ModelInput(chunks=[EncodedTextChunk(tokens=tokens)] if tokens else [])

    def generation_suffix(self, role: str, messages: list[Message]) -> list[int]:
        raise NotImplementedError("ChatTemplateRenderer renders whole prompts through the template")

    def get_stop_sequences(self) -> list[int]:
        return list(self.stop_ids)

    def parse_response(self, tokens: Sequence[int]) -> tuple[Message, ParseTermination]:
        """Content, and `reasoning_content` when the response opens with a `<think>...</think>` block."""
        text, termination = parse_until_stop_token(self.tokenizer, tokens, self.stop_ids, None)
        reasoning, content = split_thinking(text)
        message: Message = {"role": "assistant", "content": content}
        if reasoning:
            message["reasoning_content"] = reasoning
        return message, termination
