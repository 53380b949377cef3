"""Chat formats: conversations to tokens and loss weights, and sampled tokens back to messages."""

from tether.renderers.base import Message, ParseTermination, RenderedMessage, Renderer, TrainOnWhat
from tether.renderers.chat_template import ChatTemplateRenderer
from tether.renderers.llama3 import Llama3Renderer
from tether.renderers.qwen3 import Qwen3DisableThinkingRenderer, Qwen3Renderer
from tether.renderers.registry import (
    get_renderer,
    recommended_renderer_name,
    register_renderer,
    renderer_for_model,
    renderer_names,
)
from tether.renderers.role_colon import RoleColonRenderer

__all__ = [
    "ChatTemplateRenderer",
    "Llama3Renderer",
    "Message",
    "ParseTermination",
    "Qwen3DisableThinkingRenderer",
    "Qwen3Renderer",
    "RenderedMessage",
    "Renderer",
    "RoleColonRenderer",
    "TrainOnWhat",
    "get_renderer",
    "recommended_renderer_name",
    "register_renderer",
    "renderer_for_model",
    "renderer_names",
]
