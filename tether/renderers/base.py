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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

from tether.types.data import EncodedTextChunk, ModelInput
from tether.types.errors import UserInputError


class Message(TypedDict):
    """One chat message, in the Hugging Face convention.

    `reasoning_content` carries a thinking trace (Qwen3 `<think>` blocks) separately from the answer;
    `trainable` is read only with `TrainOnWhat.CUSTOMIZED`.
    """

    role: str
    content: str
    reasoning_content: NotRequired[str]
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
    the last message of a supervised example, so the model learns to emit the whole stop string.
    """

    header: list[int]
    output: list[int]
    stop_overlap: list[int] = field(default_factory=list)


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
        if "reasoning_content" in message and not isinstance(message["reasoning_content"], str):
            raise UserInputError("must be a string", field=f"{where}.reasoning_content")
        if "trainable" in message and not isinstance(message["trainable"], bool):
            raise UserInputError("must be a bool", field=f"{where}.trainable")
        checked.append(message)  # type: ignore[arg-type]
    return checked


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


def _trained_indices(messages: list[Message], train_on_what: TrainOnWhat) -> set[int]:
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    n = len(messages)
    if train_on_what is TrainOnWhat.LAST_ASSISTANT_MESSAGE:
        return {n - 1} if n and messages[-1]["role"] == "assistant" else set()
    if train_on_what is TrainOnWhat.LAST_ASSISTANT_TURN:
        return {i for i in range(last_user + 1, n) if messages[i]["role"] == "assistant"}
    if train_on_what is TrainOnWhat.ALL_ASSISTANT_MESSAGES:
        return {i for i in range(n) if messages[i]["role"] == "assistant"}
    if train_on_what in (TrainOnWhat.ALL_MESSAGES, TrainOnWhat.ALL_TOKENS):
        return set(range(n))
    if train_on_what is TrainOnWhat.ALL_USER_AND_SYSTEM_MESSAGES:
        return {i for i in range(n) if messages[i]["role"] in ("user", "system")}
    trained = set()
    for i, message in enumerate(messages):
        if "trainable" not in message:
            raise UserInputError(
                "is required with train_on_what='customized'", field=f"messages[{i}].trainable"
            )
        if message["trainable"]:
            trained.add(i)
    return trained


class Renderer:
    """Base class of every chat format. Subclasses implement `render_message` and the generation suffix."""

    name: str = "renderer"

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

    def generation_suffix(self, role: str, num_messages: int) -> list[int]:
        """What follows the rendered history to ask the model for a `role` message."""
        raise NotImplementedError

    def get_stop_sequences(self) -> list[int] | list[str]:
        """Token ids (chat formats) or strings (role_colon) that end a sampled message."""
        raise NotImplementedError

    def parse_response(self, tokens: Sequence[int]) -> tuple[Message, ParseTermination]:
        """The assistant message in sampled `tokens` (which include the stop token) and how it ended."""
        raise NotImplementedError

    # --- shared logic ------------------------------------------------------------------------

    def build_generation_prompt(
        self, messages: Sequence[Message], role: str = "assistant", prefill: str | None = None
    ) -> ModelInput:
        """The prompt that makes the model write the next `role` message, optionally prefilled."""
        checked = validate_messages(messages)
        chunks = [self.bos_tokens()]
        for rendered in self.render_conversation(checked):
            chunks += [rendered.header, rendered.output]
        chunks.append(self.generation_suffix(role, len(checked)))
        if prefill:
            chunks.append(encode_text(self.tokenizer, prefill))
        return ModelInput(chunks=[EncodedTextChunk(tokens=c) for c in chunks if c])

    def build_supervised_example(
        self,
        messages: Sequence[Message],
        train_on_what: TrainOnWhat | str = TrainOnWhat.LAST_ASSISTANT_MESSAGE,
    ) -> tuple[ModelInput, list[float]]:
        """All messages as one token sequence, with weight 1 on the tokens `train_on_what` selects.

        Headers are trained only with ALL_TOKENS; BOS never is. End-of-turn tokens belong to a
        message's output, so the model learns to stop.
        """
        checked = validate_messages(messages)
        try:
            mode = TrainOnWhat(train_on_what)
        except ValueError:
            choices = ", ".join(m.value for m in TrainOnWhat)
            raise UserInputError(
                f"unknown value {train_on_what!r}; one of: {choices}", field="train_on_what"
            ) from None
        trained = _trained_indices(checked, mode)
        chunks: list[list[int]] = []
        weights: list[float] = []
        bos = self.bos_tokens()
        chunks.append(bos)
        weights += [0.0] * len(bos)
        for index, rendered in enumerate(self.render_conversation(checked)):
            output = rendered.output
            if index == len(checked) - 1:
                output = output + rendered.stop_overlap
            header_weight = 1.0 if mode is TrainOnWhat.ALL_TOKENS else 0.0
            output_weight = 1.0 if index in trained else 0.0
            chunks += [rendered.header, output]
            weights += [header_weight] * len(rendered.header) + [output_weight] * len(output)
        model_input = ModelInput(chunks=[EncodedTextChunk(tokens=c) for c in chunks if c])
        return model_input, weights

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
