"""Renderers by name, and the choice of a renderer for a model name that never refuses a model.

`recommended_renderer_name` knows a few families by their Hugging Face names; for anything else it
uses the tokenizer's own chat template when there is one, and the plain-text `role_colon` format
otherwise. An unknown model is normal for a self-hosted server, so it is never an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tether.renderers.base import Renderer
from tether.renderers.chat_template import ChatTemplateRenderer
from tether.renderers.llama3 import Llama3Renderer
from tether.renderers.qwen3 import Qwen3DisableThinkingRenderer, Qwen3Renderer
from tether.renderers.role_colon import RoleColonRenderer
from tether.types.errors import UserInputError

RendererFactory = Callable[[Any], Renderer]

_FACTORIES: dict[str, RendererFactory] = {
    "role_colon": RoleColonRenderer,
    "llama3": Llama3Renderer,
    "qwen3": Qwen3Renderer,
    "qwen3_disable_thinking": Qwen3DisableThinkingRenderer,
    "chat_template": ChatTemplateRenderer,
}

# (pattern on the model name, renderer); first match wins. Base models get the plain-text format.
_MODEL_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(^|[/_-])base($|[/_:-])", re.IGNORECASE), "role_colon"),
    (re.compile(r"^tether/tiny-qwen3$"), "qwen3_disable_thinking"),  # it cannot reason: answer directly
    (re.compile(r"llama-3(\.\d+)?-.*instruct", re.IGNORECASE), "llama3"),
    (re.compile(r"qwen3-[\d.]+b(-a\d+b)?$", re.IGNORECASE), "qwen3"),
]


def register_renderer(name: str, factory: RendererFactory) -> None:
    """Make `get_renderer(name, tokenizer)` build `factory(tokenizer)` (replacing any earlier one)."""
    _FACTORIES[name] = factory


def renderer_names() -> list[str]:
    return sorted(_FACTORIES)


def get_renderer(name: str, tokenizer: Any) -> Renderer:
    """The renderer called `name`, bound to `tokenizer`."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise UserInputError(
            f"unknown renderer {name!r}; known: {', '.join(renderer_names())}", field="renderer_name"
        )
    return factory(tokenizer)


def recommended_renderer_name(model_name: str, tokenizer: Any | None = None) -> str:
    """The renderer for `model_name`: a known family, else the tokenizer's template, else role_colon."""
    bare = model_name.split(":", 1)[0]
    for pattern, renderer_name in _MODEL_PATTERNS:
        if pattern.search(bare):
            return renderer_name
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return "chat_template"
    return "role_colon"


def renderer_for_model(model_name: str, tokenizer: Any, renderer_name: str | None = None) -> Renderer:
    """`renderer_name` if given, else the recommended one; a family renderer the tokenizer cannot
    serve (missing special tokens) falls back to the template, then to role_colon."""
    if renderer_name:
        return get_renderer(renderer_name, tokenizer)
    candidates = [recommended_renderer_name(model_name, tokenizer), "chat_template", "role_colon"]
    for candidate in dict.fromkeys(candidates):
        try:
            return get_renderer(candidate, tokenizer)
        except UserInputError:
            continue
    return RoleColonRenderer(tokenizer)
