"""tether: a self-hosted, Tinker-compatible training API for LLMs."""

__version__ = "0.1.0"
