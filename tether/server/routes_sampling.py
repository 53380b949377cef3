"""Sampling routes of the Tinker protocol: sampling sessions, samplers and `asample`.

Sampling goes straight to the host's sampling engine (its own batching threads), never through a
training worker, so a sample never waits behind another model's training. A request repeated with
the same `(sampling_session_id, seq_id)` is answered by the first one. When too many samples are
pending on a base model, `asample` answers 429, which the SDK treats as "slow down and resubmit".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from tether.server import checkpoint_files as ckpt
from tether.server.errors import require
from tether.server.operations import submit_deduplicated
from tether.server.routes_training import register_sampler
from tether.server.state import ServerState, request_owner, server_state
from tether.types.errors import OverloadedError, UserInputError
from tether.types.proto import SampleResponseBody, WireSampledSequence, encode_sample_response, topk_from_rows

router = APIRouter(prefix="/api/v1")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CreateSamplingSessionRequest(_Body):
    session_id: str
    sampling_session_seq_id: int = Field(ge=0)
    model_path: str | None = None
    base_model: str | None = None


class ChunkBody(_Body):
    type: str = "encoded_text"
    tokens: list[int] | None = None


class ModelInputBody(_Body):
    chunks: list[ChunkBody]


class SamplingParamsBody(_Body):
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


class AsampleRequest(_Body):
    sampling_session_id: str
    seq_id: int = 0
    num_samples: int = 1
    prompt: ModelInputBody
    sampling_params: SamplingParamsBody = Field(default_factory=SamplingParamsBody)
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None
    target_prompt_logprobs: dict[str, Any] | None = None


class _PendingCounter:
    """Samples in flight per base model, for back-pressure."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def try_add(self, key: str, n: int, limit: int) -> bool:
        with self._lock:
            current = self._counts.get(key, 0)
            if current > 0 and current + n > limit:
                return False
            self._counts[key] = current + n
            return True

    def done(self, key: str, n: int) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) - n


_pending = _PendingCounter()


@router.post("/create_sampling_session")
async def create_sampling_session(body: CreateSamplingSessionRequest, state: ServerState = Depends(server_state),
                                  owner: str = Depends(request_owner)) -> dict[str, str]:
    state.catalogue.get_session(body.session_id, owner)
    sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
    if state.hosts.has_sampler(sampler_id):
        return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}
    if body.model_path is not None:
        path = ckpt.parse_tinker_path(body.model_path, field="model_path")
        require(path.segment in ("weights", "sampler_weights"),
                "sample from a weights/ or sampler_weights/ checkpoint", field="model_path")
        row = state.catalogue.get_checkpoint(path.run_id, path.checkpoint_id, owner)
        run_row = state.catalogue.get_training_run(path.run_id, row.owner)
        base_model = run_row.base_model
        host = state.hosts.host(base_model, field_name="model_path")
        weights = await asyncio.to_thread(ckpt.load_sampler_weights, row.directory)
        model_path: str | None = str(path)
    else:
        require(body.base_model is not None, "give model_path or base_model", field="base_model")
        base_model = body.base_model
        host = state.hosts.host(base_model)
        weights, model_path = None, None
    await asyncio.to_thread(register_sampler, state, sampler_id=sampler_id, owner=owner, session_id=body.session_id,
                            host=host, base_model=base_model, model_path=model_path, weights=weights)
    return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, state: ServerState = Depends(server_state),
                      owner: str = Depends(request_owner)) -> dict[str, Any]:
    row = state.catalogue.get_sampler(sampler_id, owner)
    answer: dict[str, Any] = {"sampler_id": row.sampler_id, "base_model": row.base_model}
    if row.model_path is not None:
        answer["model_path"] = row.model_path
    return answer


def _prompt_tokens(prompt: ModelInputBody) -> list[int]:
    tokens: list[int] = []
    for index, chunk in enumerate(prompt.chunks):
        if chunk.type != "encoded_text" or chunk.tokens is None:
            raise UserInputError(f"chunk {index} is {chunk.type!r}; only encoded_text is supported", field="prompt")
        tokens.extend(chunk.tokens)
    return tokens


def _check_unsupported(body: AsampleRequest, prompt_len: int) -> None:
    require(body.topk_sample_logprobs == 0, "top-k sample logprobs are not supported", field="topk_sample_logprobs")
    require(body.prompt_alt_tokens_k == 0, "prompt alternative tokens are not supported", field="prompt_alt_tokens_k")
    require(body.target_prompt_logprobs is None, "target prompt logprobs are not supported",
            field="target_prompt_logprobs")
    if body.prompt_logprobs_last_n is not None:
        require(body.prompt_logprobs, "prompt_logprobs_last_n needs prompt_logprobs=true", field="prompt_logprobs_last_n")
        require(1 <= body.prompt_logprobs_last_n <= max(prompt_len - 1, 1),
                f"must be in 1..{prompt_len - 1}", field="prompt_logprobs_last_n")


def _response_bytes(result: Any, body: AsampleRequest, prompt_len: int) -> bytes:
    prompt_logprobs = result.prompt_logprobs
    if prompt_logprobs is not None and body.prompt_logprobs_last_n is not None:
        first_kept = prompt_len - body.prompt_logprobs_last_n
        prompt_logprobs = [None if i < first_kept else v for i, v in enumerate(prompt_logprobs)]
    topk = None
    if result.topk_prompt_logprobs is not None and body.topk_prompt_logprobs > 0:
        topk = topk_from_rows(result.topk_prompt_logprobs, body.topk_prompt_logprobs)
    sequences = [
        WireSampledSequence(tokens=np.asarray(s.tokens, dtype=np.int64), logprobs=list(s.logprobs),
                            stop_reason=s.stop_reason)
        for s in result.sequences
    ]
    return encode_sample_response(SampleResponseBody(sequences=sequences, prompt_logprobs=prompt_logprobs,
                                                     topk_prompt_logprobs=topk))


@router.post("/asample")
async def asample(body: AsampleRequest, state: ServerState = Depends(server_state),
                  owner: str = Depends(request_owner)) -> dict[str, Any]:
    from tether.engine.sampling import SampleRequest

    sampler = state.hosts.sampler(body.sampling_session_id, owner)
    tokens = _prompt_tokens(body.prompt)
    _check_unsupported(body, len(tokens))
    params = body.sampling_params
    request = SampleRequest(
        prompt_tokens=tokens, num_samples=body.num_samples, max_tokens=params.max_tokens,
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed,
        stop=params.stop, weights_id=sampler.weights_id,
        include_prompt_logprobs=body.prompt_logprobs, topk_prompt_logprobs=body.topk_prompt_logprobs,
    )
    host_key = sampler.host.name
    engine = sampler.host.sampling

    def start() -> concurrent.futures.Future:
        if not _pending.try_add(host_key, body.num_samples, state.config.max_pending_samples):
            raise OverloadedError("too many samples pending on this model; retry shortly")
        try:
            engine_future = engine.submit(request)
        except BaseException:
            _pending.done(host_key, body.num_samples)
            raise
        payload: concurrent.futures.Future = concurrent.futures.Future()

        def finish(done: concurrent.futures.Future) -> None:
            _pending.done(host_key, body.num_samples)
            exc = done.exception()
            if exc is not None:
                payload.set_exception(exc)
                return
            try:
                payload.set_result(_response_bytes(done.result(), body, len(tokens)))
            except BaseException as err:  # noqa: BLE001 - reported through the future
                payload.set_exception(err)

        engine_future.add_done_callback(finish)
        return payload

    request_id, _ = submit_deduplicated(state, state.hosts.sample_dedupe, owner=owner,
                                        stream=body.sampling_session_id, seq_id=body.seq_id, start=start,
                                        kind="sample")
    return {"request_id": request_id,
            "sample_sequence_ids": [f"{request_id}:{i}" for i in range(body.num_samples)]}
