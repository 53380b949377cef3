"""Qwen3 chat format: `<|im_start|>role\\ncontent<|im_end|>`, with `<think>` reasoning and tool calls.

Tokens and loss weights equal tinker-cookbook 0.6.1's `qwen3` / `qwen3_disable_thinking` (which
default to stripping reasoning from history), message for message:

- The final assistant message, when the conversation has a user message, is framed the way the
  Qwen3 template frames the turn being produced: `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`,
  with an empty block when it did not reason. Reasoning of every earlier assistant message is
  dropped; a final assistant message with no user message before it keeps `<think>{r}</think>`.
- `tool_calls` follow the content as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
  blocks (JSON as Python's `json.dumps` writes it), one per line.
- A `tool` message (a call's result) is a user turn `<tool_response>\\n...\\n</tool_response>`.
- Message text is encoded with special tokens written literally, so content that contains
  `<|im_end|>` cannot end a turn; the framing tokens (`<think>`, `<tool_call>`) are added tokens
  that Qwen3 does not mark special, so they stay single tokens.
- `qwen3_disable_thinking` prompts with `<think>\\n\\n</think>\\n\\n` after the assistant header;
  it is untrained (it belongs to the prompt) with the LAST_ASSISTANT_* modes, and a trained turn
  that reasons is refused.

Where the cookbook differs from the Qwen3 Hugging Face template, this follows the cookbook:
reasoning of an assistant message between the last user message and the final one (a tool-using
turn) is dropped, where the template keeps it; consecutive tool results get one user block each,
where the template shares one; a turn with reasoning, no text and tool calls gets one more newline
before its first call. Roles other than system, user, assistant and tool are refused (the template
drops them).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from typing import Any

from tether.renderers.base import (
    Message,
    ParseTermination,
    RenderedMessage,
    Renderer,
    encode_text,
    last_user_index,
    parse_until_stop_token,
    reasoning_and_answer,
    require_special_token,
    split_thinking,
    tool_call_arguments,
)
from tether.types.errors import UserInputError

EMPTY_THINK_BLOCK = "<think>\n\n</think>\n\n"
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def frame_thinking(reasoning: str) -> str:
    """The Qwen3 template's block around the produced turn's reasoning (present even when empty)."""
    return "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n"


def _literal_special_tokens_encoder(tokenizer: Any) -> Any | None:
    """A private copy of the fast tokenizer's backend that writes special tokens literally.

    Setting the flag on the shared tokenizer would race between threads, so a copy is configured
    once. None for slow tokenizers (then special tokens in text are recognised).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    literal = copy.deepcopy(backend)
    literal.encode_special_tokens = True
    return literal


class Qwen3Renderer(Renderer):
    """Qwen3 with thinking left to the model."""

    name = "qwen3"
    roles = frozenset({"system", "user", "assistant", "tool"})
    supports_tool_calls = True
    supports_reasoning = True
    disables_thinking = False

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.im_end_id = require_special_token(tokenizer, "<|im_end|>", self.name)
        require_special_token(tokenizer, "<|im_start|>", self.name)
        self._literal = _literal_special_tokens_encoder(tokenizer)

    def _encode_content(self, text: str) -> list[int]:
        if not text:
            return []
        if self._literal is None:
            return encode_text(self.tokenizer, text)
        return list(self._literal.encode(text, add_special_tokens=False).ids)

    def _header_text(self, index: int, role: str) -> str:
        return ("\n" if index > 0 else "") + f"<|im_start|>{'user' if role == 'tool' else role}\n"

    def _assistant_text(self, index: int, message: Message, messages: list[Message]) -> str:
        reasoning, answer = reasoning_and_answer(message)
        is_last = index == len(messages) - 1
        if is_last and last_user_index(messages) >= 0:  # the produced turn: always framed
            text = frame_thinking(reasoning) + answer.lstrip("\n")
            has_text = bool(reasoning) or bool(answer)
        elif is_last and reasoning:
            text = f"<think>{reasoning}</think>{answer}"
            has_text = True
        else:  # history: reasoning dropped
            text, has_text = answer, bool(answer)
        calls = message.get("tool_calls") or []
        if calls:
            blocks = [
                "<tool_call>\n"
                + json.dumps({"name": call["function"]["name"], "arguments": tool_call_arguments(call)})
                + "\n</tool_call>"
                for call in calls
            ]
            text += ("\n" if has_text else "") + "\n".join(blocks)
        return text

    def render_message(self, index: int, message: Message, messages: list[Message]) -> RenderedMessage:
        role = message["role"]
        if role == "assistant":
            text = self._assistant_text(index, message, messages)
        elif role == "tool":
            text = f"<tool_response>\n{message['content']}\n</tool_response>"
        else:
            text = message["content"]
        return RenderedMessage(
            header=encode_text(self.tokenizer, self._header_text(index, role)),
            output=self._encode_content(text) + [self.im_end_id],
        )

    def create_conversation_prefix_with_tools(
        self, tools: list[dict[str, Any]], system_prompt: str = ""
    ) -> list[Message]:
        """The system message declaring `tools` (OpenAI function specs: name, description,
        parameters) in Qwen3's format, after `system_prompt` if given; prepend it to a conversation."""
        if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools
        ):
            raise UserInputError(
                "must be a list of {'name', 'description', 'parameters'} dicts", field="tools"
            )
        content = system_prompt
        if tools:
            specs = "\n".join(
                json.dumps({"type": "function", "function": t}, separators=(", ", ": ")) for t in tools
            )
            declaration = (
                "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n"
                f"<tools>\n{specs}\n</tools>\n\n"
                "For each function call, return a json object with function name and arguments within"
                " <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
            )
            content = f"{system_prompt}\n\n{declaration}" if system_prompt else declaration
        return [{"role": "system", "content": content}]

    def generation_suffix(self, role: str, messages: list[Message]) -> list[int]:
        text = self._header_text(len(messages), role)
        if self.disables_thinking:
            text += EMPTY_THINK_BLOCK
        return encode_text(self.tokenizer, text)

    def get_stop_sequences(self) -> list[int]:
        return [self.im_end_id]

    def parse_response(self, tokens: Sequence[int]) -> tuple[Message, ParseTermination]:
        """Content, `reasoning_content` (a leading think block) and `tool_calls` (well-formed
        `<tool_call>` JSON blocks, removed from the content) of a sampled assistant turn."""
        text, termination = parse_until_stop_token(self.tokenizer, tokens, [self.im_end_id], None)
        reasoning, content = split_thinking(text)
        calls = []
        for match in _TOOL_CALL.finditer(content):
            try:
                payload = json.loads(match.group(1))
            except json.JSONDecodeError:
                continue
            if isinstance(payload, dict) and isinstance(payload.get("name"), str):
                arguments = payload.get("arguments", {})
                calls.append(
                    {
                        "type": "function",
                        "function": {"name": payload["name"], "arguments": json.dumps(arguments)},
                    }
                )
        if calls:
            content = _TOOL_CALL.sub("", content).strip("\n")
        message: Message = {"role": "assistant", "content": content}
        if reasoning:  # an empty block is a turn that did not reason
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls  # type: ignore[typeddict-item]
        return message, termination


class Qwen3DisableThinkingRenderer(Qwen3Renderer):
    """Qwen3 with an empty think block in the prompt, so the model answers directly."""

    name = "qwen3_disable_thinking"
    disables_thinking = True

    def render_message(self, index: int, message: Message, messages: list[Message]) -> RenderedMessage:
        if (
            message["role"] == "assistant"
            and index == len(messages) - 1
            and message["content"]
            and last_user_index(messages) < 0
        ):
            raise UserInputError(
                "with no user message the Qwen3 template writes no empty think block on the final"
                " assistant turn, but the thinking-off prompt always has one; add a user message or"
                " use 'qwen3'",
                field=f"messages[{index}]",
            )
        return super().render_message(index, message, messages)
