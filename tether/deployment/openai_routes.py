"""OpenAI-compatible `/v1/completions`, `/v1/chat/completions` and `/v1/models` for a deployment.

Prompts may be text or token ids; chat messages go through the tokenizer's chat template with a
generation prompt. `logprobs` follow OpenAI's shapes (completions: `tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`; chat: `content[]` with `top_logprobs`), computed untempered like
every tether logprob. `stream: true` answers server-sent events as the tokens are generated (one
chunk per token that makes text final, see `tether.deployment.openai_stream`), each choice's
`finish_reason`, and `data: [DONE]`; the chunks' text concatenates to the non-streamed text.
(A streamed completion with both `echo` and `logprobs` needs the prompt's logprobs first, so it is
sent once the request has finished.) Each choice also carries `raw_output.completion_token_ids`
(as Fireworks does) and the answer names the `weights_identity` that served it.

A model name the deployment does not serve is a 404; out-of-range sampling parameters are 400s.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from tether.deployment.openai_stream import (
    SSE_DONE,
    CancellingStream,
    ChoiceStream,
    StreamToken,
    choice_pieces,
    error_chunk,
    sse,
    submit_streaming,
)
from tether.deployment.served import ServedWeights
from tether.engine.sampling import SampledSequence, SampleRequest
from tether.types.errors import NotFoundError, UserInputError

_MAX_TOP_LOGPROBS = 20
MAX_PROMPTS = 512
"""Prompts in one `/v1/completions`: they are queued at once, and the engine's waiting queue holds 1,024
requests by default, so a larger list could only ever be refused as overloaded (429, which clients retry)."""


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # kept to refuse what would change the answer (`_unsupported`)
    model: str
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    """Text, token ids, or a batch of either (token ids are strict: `true` is not token 1)."""
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    logprobs: int | None = None
    echo: bool = False
    seed: int | None = None
    stream: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    """OpenAI's roles; a chat template silently drops a message with any other role."""
    content: str | list[dict[str, Any]] | None = None


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    """`{"include_usage": true}`: a last chunk with the usage and no choices, as OpenAI sends."""


def _check_top(k: int | None, field: str) -> int:
    if k is None:
        return 0
    if not 0 <= k <= _MAX_TOP_LOGPROBS:
        raise UserInputError(f"must be between 0 and {_MAX_TOP_LOGPROBS}, got {k}", field=field)
    return k


_NEUTRAL: dict[str, Any] = {
    "logit_bias": ({}, None),
    "presence_penalty": (0, None),
    "frequency_penalty": (0, None),
    "repetition_penalty": (1, None),
    "min_tokens": (0, None),
    "suffix": ("", None),
    "tools": ([], None),
    "functions": ([], None),
    "tool_choice": ("none", "auto", None),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
}
"""Sampling options other servers honour that tether does not, with the values that change nothing.
Any other value is refused: ignoring it would answer something the caller did not ask for."""


def _unsupported(body: BaseModel) -> None:
    extra = body.model_extra or {}
    for name, neutral in _NEUTRAL.items():
        if name in extra and extra[name] not in neutral:
            raise UserInputError(
                f"is not supported by tether deployments (got {extra[name]!r:.60}); leave it out",
                field=name,
            )
    best_of = extra.get("best_of")
    if best_of is not None and best_of != getattr(body, "n", 1):
        raise UserInputError("is not supported (only best_of = n); leave it out", field="best_of")
    response_format = extra.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise UserInputError(
            f"only {{'type': 'text'}} is supported, got {response_format!r:.60}", field="response_format"
        )


def _text_only(text: str, field: str) -> str:
    """`text` if it is valid Unicode (JSON may carry lone surrogates, which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserInputError(
            f"is not valid Unicode text ({exc.reason} at position {exc.start})", field=field
        ) from exc
    return text


def _chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template takes them: content parts joined into one string.

    OpenAI's `content` may be a list of parts; templates written for string content render such a
    list as nothing, so text parts are joined with newlines (as vLLM does) and any other part
    (images, audio) is refused, naming it.
    """
    out = []
    for i, message in enumerate(messages):
        entry = message.model_dump(exclude_none=True)
        content = message.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise UserInputError(
                        f"only text parts ({{'type': 'text', 'text': ...}}) are supported, got {part!r:.80}",
                        field=f"messages[{i}].content[{j}]",
                    )
                texts.append(part["text"])
            entry["content"] = "\n".join(texts)
        if isinstance(entry.get("content"), str):
            _text_only(entry["content"], f"messages[{i}].content")
        out.append(entry)
    return out


def _stops(stop: str | list[str] | None) -> list[str] | None:
    if stop is None:
        return None
    return [stop] if isinstance(stop, str) else list(stop)


class _Text:
    """Token ids → text, cutting at stop strings and dropping a final EOS, as OpenAI servers do."""

    def __init__(self, tokenizer: Any, eos: list[int]) -> None:
        self.tokenizer = tokenizer
        self.eos = set(eos)

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def completion(self, seq: SampledSequence, stops: list[str] | None) -> tuple[list[int], str]:
        tokens = list(seq.tokens)
        if seq.stop_reason == "stop" and tokens and tokens[-1] in self.eos:
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens)
        for stop in stops or []:
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
        return tokens, text


def _sse(chunks: Iterator[dict[str, Any]]) -> StreamingResponse:
    def body() -> Iterator[str]:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def _event_stream(body: AsyncIterator[str], identity: str, futures: list[Any]) -> StreamingResponse:
    """The SSE response; when it ends (a client that goes away ends it), unfinished requests are cancelled."""
    from tether.deployment.app import IDENTITY_HEADER, identity_header

    return CancellingStream(
        body, futures, media_type="text/event-stream", headers={IDENTITY_HEADER: identity_header(identity)}
    )


def add_openai_routes(app: FastAPI, served: ServedWeights, *, model_names: list[str], tokenizer: Any) -> None:
    from tether.deployment.app import IDENTITY_HEADER, identity_header, run_request, run_requests

    base = getattr(served.backend, "base", None)
    eos = list(base.eos_token_ids) if base is not None else []
    text = _Text(tokenizer, eos)

    def check_model(name: str) -> None:
        if name not in model_names:
            raise NotFoundError(f"model {name!r} is not served by this deployment (it serves {model_names})")

    def request_for(
        tokens: list[int],
        *,
        n: int,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        top_k: int | None,
        seed: int | None,
        stop: list[str] | None,
        top: int,
        echo: bool,
    ) -> SampleRequest:
        if not tokens:
            raise UserInputError("the prompt has no tokens", field="prompt")
        return SampleRequest(
            prompt_tokens=tokens,
            num_samples=n,
            max_tokens=max_tokens,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=-1 if top_k is None else top_k,
            seed=seed,
            stop=stop,
            topk_sample_logprobs=top,
            include_prompt_logprobs=echo,
            topk_prompt_logprobs=top if echo else 0,
        )

    def top_dict(pairs: list[tuple[int, float]] | None) -> dict[str, float] | None:
        return None if pairs is None else {text.piece(t): lp for t, lp in pairs}

    def chat_entry(token: int, logprob: float, pairs: list[tuple[int, float]] | None) -> dict[str, Any]:
        return {
            "token": text.piece(token),
            "logprob": logprob,
            "bytes": list(text.piece(token).encode()),
            "top_logprobs": [
                {"token": text.piece(a), "logprob": b, "bytes": list(text.piece(a).encode())}
                for a, b in (pairs or [])
            ],
        }

    async def stream_completions(
        body: CompletionBody, prepared: list[tuple[Any, list[int], SampleRequest]], stops: Any, top: int
    ) -> StreamingResponse:
        identity, events, futures = await submit_streaming(served, [request for _, _, request in prepared])
        head = {
            "id": f"cmpl-{secrets.token_hex(8)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
        }
        n = body.n
        streams = [ChoiceStream(text, stops) for _ in range(len(prepared) * n)]
        offsets = [0] * len(streams)

        def chunk(index: int, piece: str, covered: list[StreamToken], finish: str | None = None) -> str:
            logprobs = None
            if body.logprobs is not None and covered:
                pieces = [text.piece(t.token) for t in covered]
                starts = [offsets[index] + sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
                offsets[index] += sum(len(p) for p in pieces)
                logprobs = {
                    "tokens": pieces,
                    "token_logprobs": [t.logprob for t in covered],
                    "top_logprobs": [top_dict(t.topk) for t in covered] if top else None,
                    "text_offset": starts,
                }
            choice = {"index": index, "text": piece, "logprobs": logprobs, "finish_reason": finish}
            return sse(head | {"choices": [choice]})

        async def lines() -> AsyncIterator[str]:
            usage = {"prompt_tokens": sum(len(tokens) for _, tokens, _ in prepared), "completion_tokens": 0}
            if body.echo:
                for number, (prompt, _, _) in enumerate(prepared):
                    if isinstance(prompt, str):
                        for i in range(n):
                            yield chunk(number * n + i, prompt, [])
            async for piece in choice_pieces(events, streams, n, text, stops):
                if isinstance(piece, Exception):  # failed after streaming began: say so, end the stream
                    yield sse(error_chunk(piece))
                    break
                usage["completion_tokens"] += piece.completion_tokens
                yield chunk(piece.index, piece.text, piece.covered, piece.finish)
            else:
                total = usage["prompt_tokens"] + usage["completion_tokens"]
                yield sse(head | {"choices": [], "usage": {**usage, "total_tokens": total}})
            yield SSE_DONE

        return _event_stream(lines(), identity, futures)

    async def stream_chat(body: ChatBody, request: SampleRequest, stops: Any, top: int) -> StreamingResponse:
        identity, events, futures = await submit_streaming(served, [request])
        head = {
            "id": f"chatcmpl-{secrets.token_hex(8)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.model,
        }
        streams = [ChoiceStream(text, stops) for _ in range(body.n)]

        def chunk(index: int, delta: dict[str, Any], covered: list[StreamToken], finish: str | None) -> str:
            logprobs = None
            if body.logprobs and covered:
                logprobs = {
                    "content": [chat_entry(t.token, t.logprob, t.topk if top else None) for t in covered]
                }
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return sse(head | {"choices": [choice]})

        async def lines() -> AsyncIterator[str]:
            completion_tokens = 0
            for index in range(body.n):
                yield chunk(index, {"role": "assistant", "content": ""}, [], None)
            async for piece in choice_pieces(events, streams, body.n, text, stops):
                if isinstance(piece, Exception):  # failed after streaming began: say so, end the stream
                    yield sse(error_chunk(piece))
                    break
                completion_tokens += piece.completion_tokens
                delta = {"content": piece.text} if piece.finish is None else {}
                yield chunk(piece.index, delta, piece.covered, piece.finish)
            else:
                if (body.stream_options or {}).get("include_usage"):  # OpenAI's last chunk: usage only
                    prompt_tokens = len(request.prompt_tokens)
                    usage = {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    }
                    yield sse(head | {"choices": [], "usage": usage})
            yield SSE_DONE

        return _event_stream(lines(), identity, futures)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "owned_by": "tether", "created": 0} for name in model_names
            ],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, response: Response, client: Request) -> Any:
        check_model(body.model)
        _unsupported(body)
        top = _check_top(body.logprobs, "logprobs")
        prompts: list[Any] = (
            [body.prompt]
            if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int))
            else list(body.prompt)
        )
        if not prompts:
            raise UserInputError("is an empty list; give a prompt", field="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise UserInputError(
                f"has {len(prompts)} prompts; at most {MAX_PROMPTS} per request (send them in several)",
                field="prompt",
            )
        stops = _stops(body.stop)
        prepared: list[tuple[Any, list[int], SampleRequest]] = []
        for prompt in prompts:
            tokens = (
                tokenizer.encode(_text_only(prompt, "prompt"), add_special_tokens=False)
                if isinstance(prompt, str)
                else list(prompt)
            )
            request = request_for(
                tokens,
                n=body.n,
                max_tokens=body.max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                seed=body.seed,
                stop=stops,
                top=top,
                echo=body.echo,
            )
            prepared.append((prompt, tokens, request))
        if body.stream and not (body.echo and body.logprobs is not None):
            return await stream_completions(body, prepared, stops, top)
        choices: list[dict[str, Any]] = []
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        results, identity = await run_requests(served, [request for _, _, request in prepared], client)
        for (prompt, tokens, _), result in zip(prepared, results, strict=True):
            usage["prompt_tokens"] += len(tokens)
            for seq in result.sequences:
                kept, completion = text.completion(seq, stops)
                usage["completion_tokens"] += len(seq.tokens)
                logprobs = None
                if body.logprobs is not None:
                    ids = list(tokens) + kept if body.echo else kept
                    lps = (
                        [None, *list(result.prompt_logprobs or [])[1:]] if body.echo else []
                    ) + seq.logprobs[: len(kept)]
                    tops = (
                        [None, *[top_dict(p) for p in (result.topk_prompt_logprobs or [])[1:]]]
                        if body.echo
                        else []
                    ) + [top_dict(p) for p in (seq.topk_logprobs or [])[: len(kept)]]
                    pieces = [text.piece(t) for t in ids]
                    offsets = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
                    logprobs = {
                        "tokens": pieces,
                        "token_logprobs": lps,
                        "top_logprobs": tops if top else None,
                        "text_offset": offsets,
                    }
                choices.append(
                    {
                        "index": len(choices),
                        "text": (prompt if body.echo and isinstance(prompt, str) else "") + completion,
                        "finish_reason": seq.stop_reason,
                        "logprobs": logprobs,
                        "raw_output": {
                            "prompt_token_ids": list(tokens),
                            "completion_token_ids": list(seq.tokens),
                        },
                    }
                )
        response.headers[IDENTITY_HEADER] = identity_header(identity)
        answer = {
            "id": f"cmpl-{secrets.token_hex(8)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": choices,
            "weights_identity": identity,
            "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
        }
        if not body.stream:
            return answer
        return _sse(_completion_chunks(answer, text))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, response: Response, client: Request) -> Any:
        check_model(body.model)
        _unsupported(body)
        top = _check_top(body.top_logprobs, "top_logprobs")
        top = top if body.logprobs else 0
        messages = _chat_messages(body.messages)
        try:
            encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # template errors are the caller's messages' fault
            raise UserInputError(f"cannot apply the chat template: {exc}", field="messages") from exc
        tokens = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
        stops = _stops(body.stop)
        request = request_for(
            tokens,
            n=body.n,
            max_tokens=body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=stops,
            top=top,
            echo=False,
        )
        if body.stream:
            return await stream_chat(body, request, stops, top)
        result, identity = await run_request(served, request, client)
        choices: list[dict[str, Any]] = []
        completion_tokens = 0
        for seq in result.sequences:
            kept, content = text.completion(seq, stops)
            completion_tokens += len(seq.tokens)
            logprobs = None
            if body.logprobs:
                logprobs = {
                    "content": [
                        {
                            "token": text.piece(t),
                            "logprob": lp,
                            "bytes": list(text.piece(t).encode()),
                            "top_logprobs": [
                                {"token": text.piece(a), "logprob": b, "bytes": list(text.piece(a).encode())}
                                for a, b in (seq.topk_logprobs[i] if seq.topk_logprobs else [])
                            ],
                        }
                        for i, (t, lp) in enumerate(zip(kept, seq.logprobs, strict=False))
                    ]
                }
            choices.append(
                {
                    "index": len(choices),
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": seq.stop_reason,
                    "logprobs": logprobs,
                    "raw_output": {"prompt_token_ids": tokens, "completion_token_ids": list(seq.tokens)},
                }
            )
        response.headers[IDENTITY_HEADER] = identity_header(identity)
        answer = {
            "id": f"chatcmpl-{secrets.token_hex(8)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": choices,
            "weights_identity": identity,
            "usage": {
                "prompt_tokens": len(tokens),
                "completion_tokens": completion_tokens,
                "total_tokens": len(tokens) + completion_tokens,
            },
        }
        return answer


def _completion_chunks(answer: dict[str, Any], text: _Text) -> Iterator[dict[str, Any]]:
    head = {k: answer[k] for k in ("id", "created", "model")} | {"object": "text_completion"}
    for choice in answer["choices"]:
        lp = choice["logprobs"]
        pieces = lp["tokens"] if lp else [choice["text"]]
        for i, piece in enumerate(pieces):
            chunk_lp = None
            if lp:
                chunk_lp = {
                    "tokens": [piece],
                    "token_logprobs": [lp["token_logprobs"][i]],
                    "top_logprobs": [lp["top_logprobs"][i]] if lp["top_logprobs"] else None,
                    "text_offset": [lp["text_offset"][i]],
                }
            yield head | {
                "choices": [
                    {"index": choice["index"], "text": piece, "logprobs": chunk_lp, "finish_reason": None}
                ]
            }
        yield head | {
            "choices": [
                {
                    "index": choice["index"],
                    "text": "",
                    "logprobs": None,
                    "finish_reason": choice["finish_reason"],
                }
            ]
        }
    yield head | {"choices": [], "usage": answer["usage"]}
