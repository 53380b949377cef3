"""The renderer contract: conversations to tokens and loss weights, and sampled tokens back to messages.

A renderer knows one chat format. It turns a list of messages into the exact token sequence the
model reads (`build_generation_prompt`), into a training example with a 0/1 loss weight per token
(`build_supervised_example`), says where sampling must stop (`get_stop_sequences`), and parses
sampled tokens back into a message (`parse_response`). It knows nothing about training, sampling
or HTTP: it takes a tokenizer object and returns `ModelInput`s.

Each format only has to say how one message renders (`render_message`: an untrained header and a
trainable output) and what the generation prompt adds; the weighting rules (`TrainOnWhat`) live
here once for every format.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

from tether.types.data import EncodedTextChunk, ModelInput
from tether.types.errors import UserInputError


class ToolCallFunction(TypedDict):
    name: str
    arguments: str | dict[str, Any]


class ToolCall(TypedDict):
    """A tool call in the OpenAI / Hugging Face convention; `arguments` is a JSON object or its text."""

    function: ToolCallFunction
    id: NotRequired[str]
    type: NotRequired[str]


class Message(TypedDict):
    """One chat message, in the Hugging Face convention.

    `reasoning_content` carries a thinking trace (Qwen3 `<think>` blocks) separately from the answer
    (a string content that starts with a `<think>...</think>` block means the same); `tool_calls` are
    an assistant's calls; a `tool` message is one call's result (`tool_call_id`, `name` optional);
    `trainable` is read only with `TrainOnWhat.CUSTOMIZED`.
    """

    role: str
    content: str
    reasoning_content: NotRequired[str]
    tool_calls: NotRequired[list[ToolCall]]
    tool_call_id: NotRequired[str]
    name: NotRequired[str]
    trainable: NotRequired[bool]


class TrainOnWhat(enum.StrEnum):
    """Which tokens of a conversation get loss weight 1 (the tinker-cookbook vocabulary)."""

    LAST_ASSISTANT_MESSAGE = "last_assistant_message"
    LAST_ASSISTANT_TURN = "last_assistant_turn"
    ALL_ASSISTANT_MESSAGES = "all_assistant_messages"
    ALL_MESSAGES = "all_messages"
    ALL_TOKENS = "all_tokens"
    ALL_USER_AND_SYSTEM_MESSAGES = "all_user_and_system_messages"
    CUSTOMIZED = "customized"


class ParseTermination(enum.StrEnum):
    """How a sampled response ended. Only `STOP_SEQUENCE` and `EOS` are clean ends."""

    STOP_SEQUENCE = "stop_sequence"
    EOS = "eos"
    MALFORMED = "malformed"

    @property
    def is_clean(self) -> bool:
        return self is not ParseTermination.MALFORMED


@dataclass
class RenderedMessage:
    """One message as tokens: `header` (role marker, trained only with ALL_TOKENS) then `output`.

    `stop_overlap` completes a text stop sequence (role_colon's "User:") and is appended only after
    a final assistant message of a supervised example, so the model learns to emit the whole stop
    string.
    """

    header: list[int]
    output: list[int]
    stop_overlap: list[int] = field(default_factory=list)


_MESSAGE_KEYS = {"role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name", "trainable"}


def _check_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise UserInputError("must be a list of {'function': {'name', 'arguments'}}", field=where)
    for number, call in enumerate(calls):
        at = f"{where}[{number}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise UserInputError("needs a 'function' dict with 'name' and 'arguments'", field=at)
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise UserInputError("needs a non-empty string", field=f"{at}.function.name")
        tool_call_arguments(call, field_name=f"{at}.function.arguments")


def tool_call_arguments(call: ToolCall, *, field_name: str = "tool_calls") -> dict[str, Any]:
    """A tool call's arguments as a JSON object; text arguments must parse as one."""
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"is not valid JSON ({exc.msg})", field=field_name) from None
    if not isinstance(arguments, dict):
        raise UserInputError("must be a JSON object (or its text)", field=field_name)
    return arguments


def validate_messages(messages: object, *, field_name: str = "messages") -> list[Message]:
    """Check the shape of every message up front, so a bad conversation raises before any rendering."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise UserInputError("must be a list of {'role', 'content'} messages", field=field_name)
    checked: list[Message] = []
    for index, message in enumerate(messages):
        where = f"{field_name}[{index}]"
        if not isinstance(message, dict):
            raise UserInputError(f"must be a dict, got {type(message).__name__}", field=where)
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise UserInputError("needs a non-empty string 'role'", field=f"{where}.role")
        if not isinstance(content, str):
            raise UserInputError("needs a string 'content'", field=f"{where}.content")
        unknown = sorted(set(message) - _MESSAGE_KEYS)
        if unknown:
            raise UserInputError(
                f"unknown message field(s) {unknown}; known: {sorted(_MESSAGE_KEYS)}",
                field=f"{where}.{unknown[0]}",
            )
        for key in ("reasoning_content", "tool_call_id", "name"):
            if key in message and not isinstance(message[key], str):
                raise UserInputError("must be a string", field=f"{where}.{key}")
        if "trainable" in message and not isinstance(message["trainable"], bool):
            raise UserInputError("must be a bool", field=f"{where}.trainable")
        if "tool_calls" in message:
            if role != "assistant":
                raise UserInputError("only assistant messages make tool calls", field=f"{where}.tool_calls")
            _check_tool_calls(message["tool_calls"], f"{where}.tool_calls")
        checked.append(message)  # type: ignore[arg-type]
    return checked


def reasoning_and_answer(message: Message) -> tuple[str, str]:
    """(reasoning, answer) of a message: `reasoning_content`, or a leading `<think>...</think>` block.

    An inline block is read the way the Qwen3 template reads it: reasoning is what lies between
    `<think>` and `</think>`, the answer is the rest with leading newlines removed.
    """
    content = message["content"]
    if "reasoning_content" in message:
        return message["reasoning_content"], content
    if "</think>" in content:
        before, _, after = content.partition("</think>")
        return before.split("<think>")[-1], after.lstrip("\n")
    return "", content


def split_thinking(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a response that may start with a `<think>...</think>` block."""
    if "</think>" not in text:
        return None, text
    before, _, after = text.partition("</think>")
    reasoning = before.split("<think>", 1)[-1].strip("\n")
    return reasoning, after.lstrip("\n")


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with special-token strings recognised and no BOS/EOS added."""
    if not text:
        return []
    return list(tokenizer.encode(text, add_special_tokens=False))


def special_token_id(tokenizer: Any, token: str) -> int | None:
    """The id of a special token if the tokenizer knows it as a single token, else None."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


def require_special_token(tokenizer: Any, token: str, renderer_name: str) -> int:
    token_id = special_token_id(tokenizer, token)
    if token_id is None:
        raise UserInputError(
            f"the {renderer_name!r} renderer needs the special token {token!r}, which this tokenizer lacks",
            field="renderer_name",
        )
    return token_id


def last_user_index(messages: Sequence[Message]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)


def _output_trained(index: int, messages: list[Message], mode: TrainOnWhat) -> bool:
    """Whether message `index` carries loss under `mode`, by the tinker-cookbook's rules.

    The last assistant turn starts after the last user message *before the final message*, so a
    conversation that ends with a user message still has the assistant turn before it.
    """
    role = messages[index]["role"]
    if mode is TrainOnWhat.LAST_ASSISTANT_MESSAGE:
        return index == len(messages) - 1 and role == "assistant"
    if mode is TrainOnWhat.LAST_ASSISTANT_TURN:
        return role == "assistant" and index > last_user_index(messages[:-1])
    if mode is TrainOnWhat.ALL_ASSISTANT_MESSAGES:
        return role == "assistant"
    if mode in (TrainOnWhat.ALL_MESSAGES, TrainOnWhat.ALL_TOKENS):
        return True
    if mode is TrainOnWhat.ALL_USER_AND_SYSTEM_MESSAGES:
        return role in ("user", "system")
    return bool(messages[index]["trainable"])


def _prompt_boundary(messages: list[Message], mode: TrainOnWhat) -> int | None:
    """For the modes that train "the turn sampling produces", where its generation prompt ends."""
    if mode is TrainOnWhat.LAST_ASSISTANT_MESSAGE:
        boundary = len(messages) - 1
    elif mode is TrainOnWhat.LAST_ASSISTANT_TURN:
        boundary = last_user_index(messages) + 1
    else:
        return None
    if 0 <= boundary < len(messages) and messages[boundary]["role"] == "assistant":
        return boundary
    return None


def _check_mode(messages: list[Message], train_on_what: TrainOnWhat | str) -> TrainOnWhat:
    try:
        mode = TrainOnWhat(train_on_what)
    except ValueError:
        choices = ", ".join(m.value for m in TrainOnWhat)
        raise UserInputError(
            f"unknown value {train_on_what!r}; one of: {choices}", field="train_on_what"
        ) from None
    for index, message in enumerate(messages):
        if mode is TrainOnWhat.CUSTOMIZED and "trainable" not in message:
            raise UserInputError(
                "is required with train_on_what='customized'", field=f"messages[{index}].trainable"
            )
        if mode is not TrainOnWhat.CUSTOMIZED and "trainable" in message:
            raise UserInputError(
                f"is only read with train_on_what='customized' (got {mode.value!r})",
                field=f"messages[{index}].trainable",
            )
    return mode


class Renderer:
    """Base class of every chat format. Subclasses implement `render_message` and the generation suffix.

    `roles` lists the roles the format has a rendering for (None: any role is written as its own
    name); `supports_tool_calls` says whether assistant `tool_calls` have a rendering. Anything else
    is refused with a `UserInputError` rather than rendered under an invented role or dropped.
    """

    name: str = "renderer"
    roles: frozenset[str] | None = frozenset({"system", "user", "assistant"})
    supports_tool_calls: bool = False
    supports_reasoning: bool = False
    disables_thinking: bool = False

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    # --- what a format defines -------------------------------------------------------------

    def bos_tokens(self) -> list[int]:
        """Tokens that open every sequence (never trained)."""
        return []

    def render_message(self, index: int, message: Message, messages: list[Message]) -> RenderedMessage:
        raise NotImplementedError

    def render_conversation(self, messages: list[Message]) -> list[RenderedMessage]:
        """Every message rendered; formats whose pieces depend on neighbours override this."""
        return [self.render_message(index, message, messages) for index, message in enumerate(messages)]

    def generation_suffix(self, role: str, messages: list[Message]) -> list[int]:
        """What follows the rendered `messages` to ask the model for a `role` message."""
        raise NotImplementedError

    def create_conversation_prefix_with_tools(
        self, tools: list[dict[str, Any]], system_prompt: str = ""
    ) -> list[Message]:
        """Messages declaring `tools` to the model, to prepend to a conversation (formats with tool calls)."""
        raise UserInputError(f"the {self.name!r} renderer has no tool-calling format", field="tools")

    def get_stop_sequences(self) -> list[int] | list[str]:
        """Token ids (chat formats) or strings (role_colon) that end a sampled message."""
        raise NotImplementedError

    def parse_response(self, tokens: Sequence[int]) -> tuple[Message, ParseTermination]:
        """The assistant message in sampled `tokens` (which include the stop token) and how it ended."""
        raise NotImplementedError

    # --- shared logic ------------------------------------------------------------------------

    def check_supported(self, messages: list[Message]) -> None:
        """Refuse roles and tool calls this format has no rendering for, naming the message."""
        for index, message in enumerate(messages):
            if self.roles is not None and message["role"] not in self.roles:
                raise UserInputError(
                    f"the {self.name!r} renderer has no format for role {message['role']!r};"
                    f" supported roles: {', '.join(sorted(self.roles))}",
                    field=f"messages[{index}].role",
                )
            if "reasoning_content" in message and not self.supports_reasoning:
                raise UserInputError(
                    f"the {self.name!r} renderer has no reasoning format; put the reasoning in the"
                    " content or use a renderer that has one (qwen3, chat_template)",
                    field=f"messages[{index}].reasoning_content",
                )
            if message.get("tool_calls") and not self.supports_tool_calls:
                raise UserInputError(
                    f"the {self.name!r} renderer has no tool-calling format; use a renderer that has one"
                    " (qwen3, chat_template)",
                    field=f"messages[{index}].tool_calls",
                )

    def _checked(self, messages: Sequence[Message]) -> list[Message]:
        checked = validate_messages(messages)
        self.check_supported(checked)
        return checked

    def build_generation_prompt(
        self, messages: Sequence[Message], role: str = "assistant", prefill: str | None = None
    ) -> ModelInput:
        """The prompt that makes the model write the next `role` message, optionally prefilled.

        Raises `UserInputError` for malformed messages or roles/tool calls the format lacks.
        """
        checked = self._checked(messages)
        if self.roles is not None and role not in self.roles:
            raise UserInputError(f"the {self.name!r} renderer has no format for role {role!r}", field="role")
        chunks = [self.bos_tokens()]
        for rendered in self.render_conversation(checked):
            chunks += [rendered.header, rendered.output]
        chunks.append(self.generation_suffix(role, checked))
        if prefill:
            chunks.append(encode_text(self.tokenizer, prefill))
        return ModelInput(chunks=[EncodedTextChunk(tokens=c) for c in chunks if c])

    def build_supervised_example(
        self,
        messages: Sequence[Message],
        train_on_what: TrainOnWhat | str = TrainOnWhat.LAST_ASSISTANT_MESSAGE,
    ) -> tuple[ModelInput, list[float]]:
        """All messages as one token sequence, with weight 1 on the tokens `train_on_what` selects.

        Returns (tokens, one 0.0/1.0 weight per token). Headers are trained only with ALL_TOKENS;
        BOS never is. End-of-turn tokens belong to a message's output, so the model learns to stop.
        With LAST_ASSISTANT_MESSAGE / LAST_ASSISTANT_TURN nothing the generation prompt supplies is
        trained (e.g. the empty think block of `qwen3_disable_thinking`); a renderer whose prompt
        closes the think block refuses a trained turn that reasons (`UserInputError`).
        """
        checked = self._checked(messages)
        mode = _check_mode(checked, train_on_what)
        tokens: list[int] = list(self.bos_tokens())
        weights: list[float] = [0.0] * len(tokens)
        final_start = 0
        for index, rendered in enumerate(self.render_conversation(checked)):
            final_start = len(tokens)
            output = rendered.output
            if index == len(checked) - 1 and checked[index]["role"] == "assistant":
                output = output + rendered.stop_overlap
            header_weight = 1.0 if mode is TrainOnWhat.ALL_TOKENS else 0.0
            output_weight = 1.0 if _output_trained(index, checked, mode) else 0.0
            tokens += rendered.header + output
            weights += [header_weight] * len(rendered.header) + [output_weight] * len(output)
        weights = self._untrain_generation_prompt(checked, mode, tokens, weights, final_start)
        return ModelInput.from_ints(tokens) if tokens else ModelInput(chunks=[]), weights

    def _untrain_generation_prompt(
        self,
        messages: list[Message],
        mode: TrainOnWhat,
        tokens: list[int],
        weights: list[float],
        final_start: int,
    ) -> list[float]:
        """Zero the weights of what the generation prompt supplies (a prefilled think block).

        The cookbook does this only for the LAST_ASSISTANT_* modes; tether also does it for the final
        assistant message under the other modes except ALL_TOKENS, where the cookbook would teach the
        model to write tokens it is always given.
        """
        boundary = _prompt_boundary(messages, mode)
        if boundary is None:
            if mode is TrainOnWhat.ALL_TOKENS or not messages or messages[-1]["role"] != "assistant":
                return weights
            prompt = self.build_generation_prompt(messages[:-1]).to_ints()
            if tokens[: len(prompt)] != prompt:
                return weights
            return weights[:final_start] + [0.0] * max(0, len(prompt) - final_start) + weights[len(prompt) :]
        prompt = self.build_generation_prompt(messages[:boundary]).to_ints()
        if tokens[: len(prompt)] == prompt:
            return [0.0] * len(prompt) + weights[len(prompt) :]
        if self.disables_thinking:
            raise UserInputError(
                f"{self.name!r} prompts with a closed think block (thinking off), but the trained turn"
                " does not follow that prompt (it reasons, or an assistant message precedes it); drop"
                " the reasoning or use the thinking renderer",
                field=f"messages[{boundary}]",
            )
        return weights

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def parse_until_stop_token(
    tokenizer: Any, tokens: Sequence[int], stop_ids: Sequence[int], eos_id: int | None
) -> tuple[str, ParseTermination]:
    """Decode up to the first stop (or EOS) token; clean only when that token ends the sequence.

    Sampling stops at the first stop token, so a stop token followed by more tokens, or no stop at
    all (the length limit was hit), is a malformed response.
    """
    tokens = [int(t) for t in tokens]
    end_ids = set(stop_ids) | ({eos_id} if eos_id is not None else set())
    for position, token in enumerate(tokens):
        if token in end_ids:
            text = tokenizer.decode(tokens[:position], skip_special_tokens=False)
            if position != len(tokens) - 1:
                return text, ParseTermination.MALFORMED
            return text, ParseTermination.STOP_SEQUENCE if token in stop_ids else ParseTermination.EOS
    return tokenizer.decode(tokens, skip_special_tokens=False), ParseTermination.MALFORMED
