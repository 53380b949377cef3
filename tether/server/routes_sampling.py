"""Sampling routes of the Tinker protocol: sampling sessions, samplers and `asample`.

A `Sample` op goes to the base model's trainer unordered: straight to its sampling engine (its own
batching thread), never through the training worker, so a sample never waits behind training. A request repeated with
the same `(sampling_session_id, seq_id)` is answered by the first one. When too many samples are
pending on a base model, `asample` answers 429, which the SDK treats as "slow down and resubmit".
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends

from tether.server.errors import require
from tether.server.operations import new_request_id, submit_op
from tether.server.routes_training import add_live_sampler, trainer_for
from tether.server.state import ServerState, request_owner, server_state
from tether.types import ops, wire
from tether.types.errors import OverloadedError, UserInputError
from tether.types.paths import format_sampling_session_id, parse_checkpoint_path
from tether.types.proto import SampleResponseBody, WireSampledSequence, encode_sample_response, topk_from_rows
from tether.types.sample_request import ModelLimits, SampleRequest, validate_request

router = APIRouter(prefix="/api/v1")


@router.post("/create_sampling_session")
async def create_sampling_session(
    body: wire.CreateSamplingSessionRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, str]:
    state.catalogue.get_session(body.session_id, owner)
    sampler_id = format_sampling_session_id(body.session_id, body.sampling_session_seq_id)
    if state.live.has_sampler(sampler_id):
        return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}
    if body.model_path is not None:
        path = parse_checkpoint_path(body.model_path, field="model_path")
        require(
            path.kind in ("training", "sampler"),
            "sample from a weights/ or sampler_weights/ checkpoint",
            field="model_path",
        )
        row = state.catalogue.get_checkpoint(path.training_run_id, path.checkpoint_id, owner)
        base_model = state.catalogue.get_training_run(path.training_run_id, row.owner).base_model
        trainer = await trainer_for(state, base_model, field_name="model_path")
        await asyncio.wrap_future(
            trainer.submit(ops.CreateSampler(sampler_id=sampler_id, owner=row.owner, path=path.tinker_path))
        )
        model_path: str | None = path.tinker_path
    else:
        if body.base_model is None:
            raise UserInputError("give model_path or base_model", field="base_model")
        base_model = body.base_model
        await trainer_for(state, base_model)
        model_path = None
    await asyncio.to_thread(
        add_live_sampler,
        state,
        sampler_id=sampler_id,
        owner=owner,
        session_id=body.session_id,
        base_model=base_model,
        model_path=model_path,
        has_weights=model_path is not None,
    )
    return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}


@router.post("/join_sampling_session")
async def join_sampling_session(
    body: wire.JoinSamplingSessionRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, Any]:
    """A new client counter for an unpickled SamplingClient, so its seq_ids never collide."""
    sampler = state.live.sampler(body.sampling_session_id, owner)
    return {"client_counter": sampler.next_client_counter(), "type": "join_sampling_session"}


@router.get("/samplers/{sampler_id}")
async def get_sampler(
    sampler_id: str, state: ServerState = Depends(server_state), owner: str = Depends(request_owner)
) -> dict[str, Any]:
    row = state.catalogue.get_sampler(sampler_id, owner)
    answer: dict[str, Any] = {"sampler_id": row.sampler_id, "base_model": row.base_model}
    if row.model_path is not None:
        answer["model_path"] = row.model_path
    return answer


def _prompt_tokens(prompt: wire.ModelInputJson) -> list[int]:
    tokens: list[int] = []
    for index, chunk in enumerate(prompt.chunks):
        if not isinstance(chunk, wire.EncodedTextChunkJson):
            raise UserInputError(
                f"chunk {index} is {chunk.type!r}; only encoded_text is supported",
                field=f"prompt.chunks.{index}",
            )
        tokens.extend(chunk.tokens)
    return tokens


def _check_unsupported(body: wire.SampleRequest, prompt_len: int) -> None:
    require(
        body.prompt_alt_tokens_k == 0,
        "prompt alternative tokens are not supported",
        field="prompt_alt_tokens_k",
    )
    require(
        body.target_prompt_logprobs is None,
        "target prompt logprobs are not supported",
        field="target_prompt_logprobs",
    )
    if body.prompt_logprobs_last_n is not None:
        require(
            body.prompt_logprobs,
            "prompt_logprobs_last_n needs prompt_logprobs=true",
            field="prompt_logprobs_last_n",
        )
        require(
            1 <= body.prompt_logprobs_last_n <= max(prompt_len - 1, 1),
            f"must be in 1..{prompt_len - 1}",
            field="prompt_logprobs_last_n",
        )


def _response_bytes(result: Any, body: wire.SampleRequest, prompt_len: int) -> bytes:
    prompt_logprobs = result.prompt_logprobs
    if prompt_logprobs is not None and body.prompt_logprobs_last_n is not None:
        first_kept = prompt_len - body.prompt_logprobs_last_n
        prompt_logprobs = [None if i < first_kept else v for i, v in enumerate(prompt_logprobs)]
    topk = None
    if result.topk_prompt_logprobs is not None and body.topk_prompt_logprobs > 0:
        topk = topk_from_rows(result.topk_prompt_logprobs, body.topk_prompt_logprobs)
    k = body.topk_sample_logprobs
    sequences = [
        WireSampledSequence(
            tokens=np.asarray(s.tokens, dtype=np.int64),
            logprobs=list(s.logprobs),
            stop_reason=s.stop_reason,
            topk_logprobs=topk_from_rows(s.topk_logprobs, k) if k > 0 and s.topk_logprobs else None,
        )
        for s in result.sequences
    ]
    return encode_sample_response(
        SampleResponseBody(
            sequences=sequences,
            prompt_logprobs=prompt_logprobs,
            topk_prompt_logprobs=topk,
            prompt_cache_hit_tokens=int(getattr(result, "prompt_cache_hit_tokens", 0)),
        )
    )


@router.post("/asample")
async def asample(
    body: wire.SampleRequest, state: ServerState = Depends(server_state), owner: str = Depends(request_owner)
) -> dict[str, Any]:
    require(
        body.sampling_session_id is not None,
        "sampling_session_id is required (create a sampling session first)",
        field="sampling_session_id",
    )
    assert body.sampling_session_id is not None
    sampler = state.live.sampler(body.sampling_session_id, owner)
    tokens = _prompt_tokens(body.prompt)
    _check_unsupported(body, len(tokens))
    op = ops.Sample(
        sampler_id=sampler.sampler_id if sampler.has_weights else None,
        prompt_tokens=tokens,
        num_samples=body.num_samples,
        sampling_params=body.sampling_params,
        include_prompt_logprobs=bool(body.prompt_logprobs),
        topk_prompt_logprobs=body.topk_prompt_logprobs,
        topk_sample_logprobs=body.topk_sample_logprobs,
    )
    trainer = await trainer_for(state, sampler.base_model)
    info = state.trainers.cached_base_info(sampler.base_model)
    if info is None:
        info = await asyncio.to_thread(state.trainers.base_info, sampler.base_model)
    params = body.sampling_params
    validate_request(
        SampleRequest(  # 400 now, rather than a failed future later
            prompt_tokens=tokens,
            num_samples=body.num_samples,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=params.seed,
            stop=params.stop,
            topk_prompt_logprobs=body.topk_prompt_logprobs,
            topk_sample_logprobs=body.topk_sample_logprobs,
        ),
        ModelLimits(info.vocab_size, info.max_context_length, tuple(info.eos_token_ids)),
    )
    if body.seq_id is not None:
        earlier = state.dedupe.lookup(sampler.sampler_id, body.seq_id)
        if earlier is not None:
            return {
                "request_id": earlier,
                "sample_sequence_ids": [f"{earlier}:{i}" for i in range(body.num_samples)],
            }
    if not state.live.reserve_samples(sampler.base_model, body.num_samples, state.config.max_pending_samples):
        raise OverloadedError("too many samples pending on this model; retry shortly")

    def release(_: object = None) -> None:
        state.live.release_samples(sampler.base_model, body.num_samples)

    new_id = new_request_id("sample")  # known before the op can finish: its records are kept under it

    def finish(result: ops.SampleOutput) -> bytes:
        release()
        if body.record_stability_info:  # for stable_reinforce: `<request_id>:<i>` names sequence i
            state.stability.record(
                new_id,
                owner=owner,
                session_id=sampler.session_id,
                prompt=tokens,
                sequences=[(s.tokens, s.logprobs) for s in result.sequences],
            )
        return _response_bytes(result, body, len(tokens))

    try:
        request_id = submit_op(
            state,
            trainer,
            op,
            owner=owner,
            kind="sample",
            dedupe_stream=sampler.sampler_id,
            seq_id=body.seq_id,
            finish=finish,
            on_error=release,
            request_id=new_id,
        )
    except BaseException:
        release()
        raise
    if request_id != new_id:  # a concurrent retry claimed this seq_id first: nothing was queued
        release()
    return {
        "request_id": request_id,
        "sample_sequence_ids": [f"{request_id}:{i}" for i in range(body.num_samples)],
    }
