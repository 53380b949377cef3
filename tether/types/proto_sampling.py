"""Codec of the `SampleResponse` the server returns for asample (tinker-protocol.md §5.6, §6.3):
int32 tokens, float32 logprobs with NaN for "not computed", top-k matrices padded with a sentinel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from google.protobuf.message import DecodeError

from tether.types import proto_schema as pb
from tether.types.proto_tensors import RESULT_DTYPES, tensor_from_proto, tensor_to_proto

StopReason = Literal["stop", "length"]

TOPK_MASK_LOGPROB = -99999.0
"""Logprob of an empty top-k cell (token id 0); the SDK reads a row starting with it as None."""


@dataclass
class WireTopk:
    """Top-k logprobs as dense `(length, k)` matrices; empty cells are (0, TOPK_MASK_LOGPROB)."""

    token_ids: np.ndarray
    logprobs: np.ndarray


@dataclass
class WireSampledSequence:
    """One sampled sequence: tokens, optional per-token logprobs and top-k, and why it stopped."""

    tokens: Sequence[int] | np.ndarray
    logprobs: Sequence[float] | np.ndarray | None
    stop_reason: StopReason
    topk_logprobs: WireTopk | None = None


@dataclass
class SampleResponseBody:
    """A `SampleResponse`. `prompt_logprobs` holds None (NaN on the wire) where not computed."""

    sequences: list[WireSampledSequence]
    prompt_logprobs: Sequence[float | None] | np.ndarray | None = None
    topk_prompt_logprobs: WireTopk | None = None
    prompt_cache_hit_tokens: int = 0
    target_prompt_logprobs: np.ndarray | None = None
    prompt_alt_tokens: tuple[np.ndarray, np.ndarray] | None = None
    """(token ids int64 `[len-1, k]`, logprobs float32 `[len-1, k]`) when requested."""


def topk_from_rows(rows: Sequence[Sequence[tuple[int, float]] | None], k: int) -> WireTopk:
    """Pack per-position `(token_id, logprob)` lists (None = not computed) into padded matrices."""
    token_ids = np.zeros((len(rows), k), dtype=np.int32)
    logprobs = np.full((len(rows), k), TOPK_MASK_LOGPROB, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (token_id, logprob) in enumerate((row or [])[:k]):
            token_ids[i, j] = token_id
            logprobs[i, j] = logprob
    return WireTopk(token_ids=token_ids, logprobs=logprobs)


def topk_to_rows(topk: WireTopk) -> list[list[tuple[int, float]] | None]:
    """Inverse of `topk_from_rows`: trailing empty cells dropped, an all-empty row is None."""
    rows: list[list[tuple[int, float]] | None] = []
    for ids, lps in zip(topk.token_ids.tolist(), topk.logprobs.tolist(), strict=True):
        cells = [(int(t), float(lp)) for t, lp in zip(ids, lps, strict=True)]
        while cells and cells[-1] == (0, TOPK_MASK_LOGPROB):
            cells.pop()
        rows.append(cells if cells and ids and not (ids[0] == 0 and lps[0] == TOPK_MASK_LOGPROB) else None)
    return rows


def _topk_to_proto(topk: WireTopk, target) -> None:
    ids = np.asarray(topk.token_ids, dtype="<i4")
    lps = np.asarray(topk.logprobs, dtype="<f4")
    if ids.shape != lps.shape or ids.ndim != 2:
        raise ValueError(f"top-k matrices must both be (length, k), got {ids.shape} and {lps.shape}")
    target.token_ids = np.ascontiguousarray(ids).tobytes()
    target.logprobs = np.ascontiguousarray(lps).tobytes()
    target.length, target.k = ids.shape


def _topk_from_proto(msg) -> WireTopk | None:
    if msg.length == 0 or msg.k == 0:
        return None
    shape = (msg.length, msg.k)
    return WireTopk(
        token_ids=np.frombuffer(msg.token_ids, dtype="<i4").reshape(shape).astype(np.int64),
        logprobs=np.frombuffer(msg.logprobs, dtype="<f4").reshape(shape).copy(),
    )


def _nan_for_none(values: Sequence[float | None] | np.ndarray) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values.astype("<f4")
    return np.array([math.nan if v is None else v for v in values], dtype="<f4")


def encode_sample_response(body: SampleResponseBody) -> bytes:
    """Serialize a `SampleResponse` (§5.6, §6.3): int32 tokens, float32 logprobs, NaN for None."""
    msg = pb.SampleResponse(prompt_cache_hit_tokens=body.prompt_cache_hit_tokens)
    for sequence in body.sequences:
        seq_msg = msg.sequences.add()
        if sequence.stop_reason not in ("stop", "length"):
            raise ValueError(f"stop_reason must be 'stop' or 'length', got {sequence.stop_reason!r}")
        seq_msg.stop_reason = (
            pb.STOP_REASON_LENGTH if sequence.stop_reason == "length" else pb.STOP_REASON_STOP
        )
        seq_msg.tokens = np.asarray(sequence.tokens, dtype="<i4").tobytes()
        if sequence.logprobs is not None:
            if len(sequence.logprobs) != len(sequence.tokens):
                raise ValueError("a sequence needs one logprob per token")
            seq_msg.logprobs = _nan_for_none(sequence.logprobs).tobytes()
        if sequence.topk_logprobs is not None:
            _topk_to_proto(sequence.topk_logprobs, seq_msg.topk_sampled_logprobs)
    if body.prompt_logprobs is not None:
        msg.prompt_logprobs = _nan_for_none(body.prompt_logprobs).tobytes()
    if body.topk_prompt_logprobs is not None:
        _topk_to_proto(body.topk_prompt_logprobs, msg.topk_prompt_logprobs)
    if body.target_prompt_logprobs is not None:
        msg.target_prompt_logprobs.CopyFrom(
            tensor_to_proto(np.asarray(body.target_prompt_logprobs, dtype=np.float32))
        )
    if body.prompt_alt_tokens is not None:
        tokens, logprobs = body.prompt_alt_tokens
        msg.prompt_alt_tokens.tokens.CopyFrom(tensor_to_proto(np.asarray(tokens, dtype=np.int64)))
        msg.prompt_alt_tokens.logprobs.CopyFrom(tensor_to_proto(np.asarray(logprobs, dtype=np.float32)))
    return msg.SerializeToString(deterministic=True)


def decode_sample_response(body: bytes) -> SampleResponseBody:
    """Parse a `SampleResponse`; NaN prompt logprobs become None, as the SDK presents them."""
    msg = pb.SampleResponse()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise ValueError(f"not a tinker_public.SampleResponse: {exc}") from exc
    sequences = []
    for seq_msg in msg.sequences:
        if seq_msg.stop_reason not in (pb.STOP_REASON_STOP, pb.STOP_REASON_LENGTH):
            raise ValueError(f"unknown stop_reason enum {seq_msg.stop_reason}")
        sequences.append(
            WireSampledSequence(
                tokens=np.frombuffer(seq_msg.tokens, dtype="<i4").astype(np.int64).tolist(),
                logprobs=np.frombuffer(seq_msg.logprobs, dtype="<f4").tolist() if seq_msg.logprobs else None,
                stop_reason="length" if seq_msg.stop_reason == pb.STOP_REASON_LENGTH else "stop",
                topk_logprobs=_topk_from_proto(seq_msg.topk_sampled_logprobs)
                if seq_msg.HasField("topk_sampled_logprobs")
                else None,
            )
        )
    prompt_logprobs = None
    if msg.prompt_logprobs:
        prompt_logprobs = [
            None if math.isnan(v) else v for v in np.frombuffer(msg.prompt_logprobs, dtype="<f4").tolist()
        ]

    def tensor(t) -> np.ndarray:
        return tensor_from_proto(
            t, field_name="response", datum_index=None, sparse_pad=0.0, dtypes=RESULT_DTYPES
        )

    return SampleResponseBody(
        sequences=sequences,
        prompt_logprobs=prompt_logprobs,
        topk_prompt_logprobs=_topk_from_proto(msg.topk_prompt_logprobs)
        if msg.HasField("topk_prompt_logprobs")
        else None,
        prompt_cache_hit_tokens=msg.prompt_cache_hit_tokens,
        target_prompt_logprobs=tensor(msg.target_prompt_logprobs)
        if msg.HasField("target_prompt_logprobs")
        else None,
        prompt_alt_tokens=(tensor(msg.prompt_alt_tokens.tokens), tensor(msg.prompt_alt_tokens.logprobs))
        if msg.HasField("prompt_alt_tokens")
        else None,
    )
