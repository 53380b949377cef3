"""What a caller asks the sampling engine for, what it gets back, and the checks done at submit.

Every check here runs on the caller's thread before a request reaches the running batch, so a bad
request is refused with a `UserInputError` naming the field and never disturbs the other requests.

This module knows nothing about models or tensors, so the server checks a request against the
model's limits (`ModelLimits`) before it reaches a trainer, and the sampling engine checks it again.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

from tether.types.errors import UserInputError

StopReason = Literal["stop", "length"]


@dataclass
class SampleRequest:
    """One sampling call: a prompt, how many continuations, and how to pick their tokens."""

    prompt_tokens: Sequence[int]
    """The prompt as token ids; at least one token."""
    num_samples: int = 1
    """Independent continuations of the prompt; they share one prefill of the prompt."""
    max_tokens: int | None = None
    """Most tokens to generate per sample. None = up to the model's context length."""
    temperature: float = 1.0
    """Softmax temperature; 0 picks the most likely token (greedy)."""
    top_k: int = -1
    """Sample among the k most likely tokens only; -1 = no limit."""
    top_p: float = 1.0
    """Sample among the smallest set of tokens whose probability reaches top_p (nucleus), in (0, 1]."""
    seed: int | None = None
    """Same seed, same prompt and parameters -> same tokens, whatever else shares the batch."""
    stop: None | str | Sequence[int] | Sequence[str] = None
    """None: stop at the model's EOS tokens. [] : never stop early (EOS included). Token ids or strings:
    stop at any of them, or at EOS. The token or the tokens of the string that stopped are returned."""
    weights_id: str | None = None
    """Registered weights to sample from; None = the base model."""
    include_prompt_logprobs: bool = False
    """Also return the logprob of every prompt token given the tokens before it (None at position 0)."""
    topk_prompt_logprobs: int = 0
    """Also return the k most likely tokens and their logprobs at every prompt position; 0 = off."""
    topk_sample_logprobs: int = 0
    """Also return the k most likely tokens and their logprobs at every generated position; 0 = off."""


@dataclass
class SampledSequence:
    """One continuation.

    `logprobs[i]` is the untempered log-probability of `tokens[i]`: log_softmax of the model's raw
    logits, before temperature, top-k or top-p. At temperature 1 it equals the trainer's forward
    logprob of the same token.
    """

    tokens: list[int]
    logprobs: list[float]
    stop_reason: StopReason
    topk_logprobs: list[list[tuple[int, float]]] | None = None
    """With `topk_sample_logprobs` = k: per generated token, the k most likely (token id, untempered
    logprob) pairs of the distribution it was drawn from, most likely first."""


@dataclass
class SampleResult:
    """All continuations of one request, plus the prompt logprobs when asked for."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    """One per prompt token; None at position 0 (nothing precedes it)."""
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    """Per prompt position, (token id, logprob) pairs, most likely first; None at position 0."""
    prompt_cache_hit_tokens: int = 0
    """Prompt tokens whose prefill was reused from an earlier identical prompt instead of computed."""


@dataclass(frozen=True)
class StopSpec:
    """The stops of one request after normalisation: token ids and strings, EOS already resolved."""

    token_ids: frozenset[int] = frozenset()
    strings: tuple[str, ...] = ()


MAX_TOPK_ENTRIES = 1 << 20
"""Default bound on top-k logprob pairs per request (1M: ~12 MB as arrays, ~120 MB as Python tuples)."""


@dataclass(frozen=True)
class ModelLimits:
    """The facts about the model that bound a valid request."""

    vocab_size: int
    max_context_length: int
    eos_token_ids: tuple[int, ...] = ()
    max_topk_entries: int = MAX_TOPK_ENTRIES
    """Most (token, logprob) pairs the top-k answers of one request may hold, prompt and samples together."""


@dataclass(frozen=True)
class ValidatedRequest:
    """A request that passed every check, with defaults filled in."""

    prompt_tokens: tuple[int, ...]
    num_samples: int
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: StopSpec
    weights_id: str | None
    include_prompt_logprobs: bool
    topk_prompt_logprobs: int
    topk_sample_logprobs: int
    reserved_tokens_per_sample: int = field(default=0)
    """KV-cache tokens one sample may occupy at most: prompt plus max_tokens."""

    @property
    def reserved_tokens(self) -> int:
        return self.reserved_tokens_per_sample * self.num_samples


def _is_int(value: object) -> bool:
    """Python and NumPy integers; not bools (a True token id is a caller mistake)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate_request(request: SampleRequest, limits: ModelLimits) -> ValidatedRequest:
    """Check `request` against `limits`; raise `UserInputError` naming the first bad field."""
    prompt = list(request.prompt_tokens)
    if not prompt:
        raise UserInputError("the prompt is empty; give at least one token", field="prompt")
    for position, token in enumerate(prompt):
        if not _is_int(token) or not 0 <= token < limits.vocab_size:
            raise UserInputError(
                f"token {token!r} at position {position} is outside the vocabulary 0..{limits.vocab_size - 1}",
                field="prompt",
            )
    room = limits.max_context_length - len(prompt)
    if room < 1:
        raise UserInputError(
            f"the prompt has {len(prompt)} tokens; the context holds {limits.max_context_length} including"
            " at least one generated token",
            field="prompt",
        )
    if not _is_int(request.num_samples) or request.num_samples < 1:
        raise UserInputError(f"must be an integer >= 1, got {request.num_samples!r}", field="num_samples")
    max_tokens = room if request.max_tokens is None else request.max_tokens
    if not _is_int(max_tokens) or max_tokens < 1:
        raise UserInputError(f"must be an integer >= 1, got {request.max_tokens!r}", field="max_tokens")
    if max_tokens > room:
        raise UserInputError(
            f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds the context length"
            f" {limits.max_context_length}",
            field="max_tokens",
        )
    temperature = request.temperature
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
    ):
        raise UserInputError(f"must be a finite number, got {temperature!r}", field="temperature")
    if temperature < 0:
        raise UserInputError(f"must be >= 0, got {temperature}", field="temperature")
    if not _is_int(request.top_k) or (request.top_k < 1 and request.top_k != -1):
        raise UserInputError(
            f"must be -1 (no limit) or an integer >= 1, got {request.top_k!r}", field="top_k"
        )
    top_p = request.top_p
    if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not (0 < top_p <= 1):
        raise UserInputError(f"must be in (0, 1], got {top_p!r}", field="top_p")
    if request.seed is not None and not _is_int(request.seed):
        raise UserInputError(f"must be an integer, got {request.seed!r}", field="seed")
    if not _is_int(request.topk_sample_logprobs) or request.topk_sample_logprobs < 0:
        raise UserInputError(
            f"must be an integer >= 0, got {request.topk_sample_logprobs!r}", field="topk_sample_logprobs"
        )
    if not _is_int(request.topk_prompt_logprobs) or request.topk_prompt_logprobs < 0:
        raise UserInputError(
            f"must be an integer >= 0, got {request.topk_prompt_logprobs!r}", field="topk_prompt_logprobs"
        )
    _check_topk(request, limits, len(prompt), max_tokens)
    return ValidatedRequest(
        prompt_tokens=tuple(int(t) for t in prompt),
        num_samples=request.num_samples,
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_k=request.top_k,
        top_p=float(top_p),
        seed=request.seed,
        stop=normalize_stop(request.stop, limits),
        weights_id=request.weights_id,
        include_prompt_logprobs=bool(request.include_prompt_logprobs),
        topk_prompt_logprobs=request.topk_prompt_logprobs,
        topk_sample_logprobs=request.topk_sample_logprobs,
        reserved_tokens_per_sample=len(prompt) + max_tokens,
    )


def _check_topk(request: SampleRequest, limits: ModelLimits, prompt_len: int, max_tokens: int) -> None:
    """Top-k counts above the vocabulary, or answers too large to build, are refused before any work."""
    for name in ("topk_prompt_logprobs", "topk_sample_logprobs"):
        k = getattr(request, name)
        if k > limits.vocab_size:
            raise UserInputError(
                f"{k} is more than the model's vocabulary of {limits.vocab_size} tokens", field=name
            )
    prompt_pairs = request.topk_prompt_logprobs * prompt_len
    sample_pairs = request.topk_sample_logprobs * request.num_samples * max_tokens
    if prompt_pairs + sample_pairs > limits.max_topk_entries:
        name = "topk_prompt_logprobs" if prompt_pairs >= sample_pairs else "topk_sample_logprobs"
        raise UserInputError(
            f"the answer would hold {prompt_pairs + sample_pairs} top-k (token, logprob) pairs, more than the "
            f"{limits.max_topk_entries} one request may; ask for fewer, or for fewer tokens or samples",
            field=name,
        )


def normalize_stop(stop: None | str | Sequence[int] | Sequence[str], limits: ModelLimits) -> StopSpec:
    """Resolve the three spellings of `stop` into token ids and strings.

    None keeps EOS stopping; an empty list disables every stop, EOS included (the Tinker rule). A
    non-empty list stops at its entries and, like vLLM's default, still at EOS.
    """
    eos = frozenset(limits.eos_token_ids)
    if stop is None:
        return StopSpec(token_ids=eos)
    if isinstance(stop, str):
        stop = [stop]
    entries = list(stop)
    if not entries:
        return StopSpec()
    if all(_is_int(entry) for entry in entries):
        token_ids = cast("list[int]", entries)  # `all` does not narrow; NumPy integers included
        for entry in token_ids:
            if not 0 <= entry < limits.vocab_size:
                raise UserInputError(f"stop token {entry} is outside the vocabulary", field="stop")
        return StopSpec(token_ids=eos | frozenset(int(e) for e in token_ids))
    if all(isinstance(entry, str) for entry in entries):
        strings = cast("list[str]", entries)  # `all` does not narrow
        if any(entry == "" for entry in strings):
            raise UserInputError("stop strings must not be empty", field="stop")
        for text in strings:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate (JSON allows "\ud800"): never generated
                raise UserInputError(
                    f"stop string {text!r} is not valid Unicode ({exc.reason})", field="stop"
                ) from exc
        return StopSpec(token_ids=eos, strings=tuple(dict.fromkeys(strings)))
    raise UserInputError(
        "must be a string, a list of token ids or a list of strings, not a mix", field="stop"
    )
