"""The sampling engine: continuous batching over one shared base model and any registered weights.

`submit` validates a request on the caller's thread and queues it; a background thread runs

    schedule (admit waiting requests that fit) -> execute (prefill them; decode every running
    sequence one token, one batch per model) -> update (sample, append, finish, publish)

Requests admitted together are prefilled together: one forward pass per model over their prompts
left-padded to a common length (`prefill_batches` pads only where it pays; LoRA adapters routed
per row), identical prompts once. Sequences join the running batch after their prefill and leave as
soon as they finish, so a short request never waits for a long one. All samples of a request share
its prompt's prefill (its KV row is copied once per sample). Requests for different LoRA adapters
decode in the same batch; full fine-tuned weights batch with each other on their own model. A
failing forward pass fails only the requests it carried (a failed batched prefill is retried prompt
by prompt).

Logprobs are untempered (see `SampledSequence`). A caller that streams passes `on_token` to
`submit`: it is called on the engine's thread with each token as soon as it is sampled.

Cancelling: `cancel(future)` (or `future.cancel()`, which is the same thing, and which
`asyncio.wrap_future` calls when its awaiting task is cancelled) stops a request whether it waits or
runs. Its future ends cancelled at once; at its next step the engine drops it from the waiting queue
or from the running batch (its KV-cache rows and reservation go back to the pool, its weights are
released) and counts it in `stats().cancelled`. Its batch-mates continue exactly as when a
neighbour finishes. Futures therefore stay pending (never "running") until they complete.

This module knows nothing about HTTP or the Tinker wire format.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Protocol, cast

import torch
from torch import nn

from tether.engine.lora import LoraSpec
from tether.engine.sampling.kv_cache import BatchKVCache
from tether.engine.sampling.model_runner import PrefillOutput, PrefillPrompt, decode, prefill_batch
from tether.engine.sampling.next_token import RowSampling, choose_tokens, make_generator, untempered_logprobs
from tether.engine.sampling.prompt_cache import PromptCache
from tether.engine.sampling.requests import (
    DecodeGroup,
    EngineStats,
    RequestState,
    RunningSequence,
    Started,
    TokenCallback,
    holds_retired_weights,
    prefill_key,
)
from tether.engine.sampling.scheduler import (
    DEFAULT_PREFILL_FORWARD_COST_TOKENS,
    Scheduler,
    SchedulerConfig,
    WorkCost,
    prefill_batches,
)
from tether.engine.sampling.stopping import StopCondition
from tether.engine.sampling.weights import WeightsRegistry
from tether.types.errors import ConfigurationError, ServerError, TetherError
from tether.types.sample_request import (
    ModelLimits,
    SampledSequence,
    SampleRequest,
    SampleResult,
    StopReason,
    validate_request,
)

logger = logging.getLogger(__name__)


class BaseModelLike(Protocol):
    """What the engine needs of `tether.engine.model_loading.LoadedBaseModel` (read-only)."""

    @property
    def model(self) -> nn.Module: ...
    @property
    def tokenizer_path(self) -> object: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def max_context_length(self) -> int: ...
    @property
    def eos_token_ids(self) -> list[int]: ...


class SamplingEngine:
    """Serves `SampleRequest`s for the base model and registered weights from a background thread."""

    def __init__(
        self,
        base: BaseModelLike,
        *,
        kv_cache_budget_tokens: int = 65536,
        max_batch_size: int = 64,
        max_prefill_tokens_per_step: int = 4096,
        max_waiting_requests: int = 1024,
        prompt_cache_tokens: int | None = 16384,
        prefill_forward_cost_tokens: float = DEFAULT_PREFILL_FORWARD_COST_TOKENS,
    ) -> None:
        """`prompt_cache_tokens`: prompt tokens of recent prefills kept for reuse by identical
        prompts, also those arriving together (None = no reuse across requests); their KV memory
        comes on top of `kv_cache_budget_tokens`. `prefill_forward_cost_tokens`: prompts admitted
        together are prefilled in batched forward passes, left-padded only as far as the padding
        costs less than the passes it saves, a pass costing this many prompt tokens (0 = only equal
        lengths together); see `prefill_batches`. The other
        limits are documented on `SchedulerConfig`."""
        self._base = base
        self._limits = ModelLimits(base.vocab_size, base.max_context_length, tuple(base.eos_token_ids))
        self._scheduler: Scheduler[RequestState] = Scheduler(
            SchedulerConfig(
                kv_cache_budget_tokens, max_batch_size, max_prefill_tokens_per_step, max_waiting_requests
            )
        )
        self._weights = WeightsRegistry(base.model)
        self._groups: dict[int, DecodeGroup] = {}
        if prompt_cache_tokens is not None and prompt_cache_tokens < 1:
            raise ConfigurationError("must be >= 1, or None to disable reuse", field="prompt_cache_tokens")
        self._prompt_cache: PromptCache[PrefillOutput] | None = (
            None if prompt_cache_tokens is None else PromptCache(prompt_cache_tokens)
        )
        if not prefill_forward_cost_tokens >= 0:
            raise ConfigurationError("must be >= 0", field="prefill_forward_cost_tokens")
        self._prefill_forward_cost_tokens = prefill_forward_cost_tokens
        self._seen_drops = 0
        self._decode_text: Callable[[Sequence[int]], str] | None = None
        self._cond = threading.Condition()
        self._outcomes = {"completed": 0, "failed": 0, "cancelled": 0}
        self._cancels = 0
        """Futures cancelled by their callers so far (the loop looks for them when this moves)."""
        self._cancels_seen_waiting = 0
        self._cancels_seen_running = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="tether-sampling-engine", daemon=True)
        self._thread.start()

    # --- public surface ---------------------------------------------------------------------------
    def register_lora(self, weights_id: str, spec: LoraSpec, tensors: dict[str, torch.Tensor]) -> None:
        """Serve a LoRA adapter (tensors `<module path>.lora_A/.lora_B`) on the shared base weights."""
        self._weights.register_lora(weights_id, spec, tensors)

    def register_full(self, weights_id: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Serve full fine-tuned weights on a model of their own."""
        self._weights.register_full(weights_id, state_dict)

    def unregister(self, weights_id: str) -> None:
        """Stop accepting requests for `weights_id`; its running requests still finish."""
        self._weights.unregister(weights_id)

    def submit(
        self, request: SampleRequest, *, on_token: TokenCallback | None = None
    ) -> Future[SampleResult]:
        """Queue `request`. Raises `UserInputError` (bad request), `NotFoundError` (unknown weights_id)
        or `OverloadedError` (queue full) at once; other failures arrive as the future's exception.

        `on_token` (optional) sees every generated token as it is sampled, before the future
        completes (see `TokenCallback`). The future and `on_token` run on the engine's thread, so
        they should be quick; an exception from `on_token` is logged and stops its calls only.
        The future is the request's handle: `cancel(future)` stops it."""
        validated = validate_request(request, self._limits)
        cost = WorkCost(validated.reserved_tokens, validated.num_samples, len(validated.prompt_tokens))
        self._scheduler.check_fits(cost)
        stop = StopCondition(validated.stop, self._text_decoder() if validated.stop.strings else None)
        weights = self._weights.acquire(validated.weights_id)
        state = RequestState(validated, Future(), weights, stop, on_token)
        try:
            with self._cond:
                if self._closed:
                    raise ServerError("the sampling engine is closed")
                self._scheduler.add(state, cost)
                self._cond.notify()
        except BaseException:
            self._weights.release(weights)
            raise
        state.future.add_done_callback(self._noticed_cancel)
        return state.future

    def cancel(self, future: Future[SampleResult]) -> bool:
        """Stop the request `future` came from (`submit`), queued or running.

        Returns True if it was not finished: its future is now cancelled (`result()` raises
        `concurrent.futures.CancelledError`, its done-callbacks ran), `on_token` is not called
        after the engine's current step, and at that step its KV-cache rows, reservation and weights
        are released and `stats().cancelled` counts it. False if it had already finished (no-op).
        Thread-safe; `future.cancel()` does the same."""
        return future.cancel()

    def stats(self) -> EngineStats:
        """A consistent snapshot of the queue, the KV-cache reservation and the outcomes so far."""
        with self._cond:
            return self._stats()

    def wait_for_stats(self, predicate: Callable[[EngineStats], bool], timeout: float) -> EngineStats:
        """Block until `predicate(stats())` holds (re-checked whenever a request is admitted, released
        or settled); returns those stats. Raises `TimeoutError` after `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self._stats()), timeout):
                raise TimeoutError(
                    f"engine stats did not reach the condition in {timeout} s: {self._stats()}"
                )
            return self._stats()

    def _stats(self) -> EngineStats:
        scheduler = self._scheduler
        return EngineStats(
            scheduler.queue_depth, scheduler.running_sequences, scheduler.reserved_tokens, **self._outcomes
        )

    def _noticed_cancel(self, future: Future[SampleResult]) -> None:
        """Done-callback of every request's future: a cancellation wakes the loop to drop it."""
        if future.cancelled():
            with self._cond:
                self._cancels += 1
                self._cond.notify_all()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for admission (the service answers 429 when this stays high)."""
        with self._cond:
            return self._scheduler.queue_depth

    @property
    def running_sequences(self) -> int:
        with self._cond:
            return self._scheduler.running_sequences

    def close(self) -> None:
        """Stop the loop; waiting and running requests fail with `ServerError`; adapters leave the base."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        with self._cond:
            waiting = self._scheduler.drain()
        for state in waiting:  # never admitted: nothing reserved
            self._forget_waiting(state, ServerError("the sampling engine closed before this request ran"))
        for group in list(self._groups.values()):
            for state in {id(s.owner): s.owner for s in group.sequences}.values():
                self._abandon(state, ServerError("the sampling engine closed during this request"))
        self._groups.clear()
        self._weights.clear()
        if self._prompt_cache is not None:
            self._prompt_cache.clear()

    # --- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        """schedule -> execute (prefill the admitted, decode the running) -> update, until closed."""
        while (admitted := self._schedule()) is not None:
            try:
                self._forget_dropped_weights()
                self._join(self._start(admitted))
                self._drop_cancelled()
                for group in list(self._groups.values()):
                    self._decode_group(group)
            except Exception as exc:  # a bug must not hang every future: fail what is in flight, go on
                logger.exception("sampling step failed")
                in_flight = [s.owner for group in self._groups.values() for s in group.sequences]
                self._groups.clear()
                for state in {id(s): s for s in [*admitted, *in_flight]}.values():
                    self._abandon(state, exc)

    def _schedule(self) -> list[RequestState] | None:
        """Wait for work; drop cancelled waiting requests; admit what fits. None once closed."""
        with self._cond:
            while not self._closed and not self._scheduler.has_waiting and not self._groups:
                self._cond.wait()
            if self._closed:
                return None
            cancelled: list[RequestState] = []
            if self._cancels != self._cancels_seen_waiting:
                self._cancels_seen_waiting = self._cancels
                cancelled = self._scheduler.remove_where(lambda state: state.future.cancelled())
            admitted = self._scheduler.schedule()
            if admitted:
                self._cond.notify_all()  # stats waiters
        for state in cancelled:
            self._forget_waiting(state, None)
        return admitted

    def _join(self, started: list[Started]) -> None:
        """Add freshly prefilled sequences to their model's running group, one cache merge per group.

        Each prefill cache joins once, row r repeated once per running sample whose prompt is row r."""
        by_model: dict[
            int, tuple[nn.Module, dict[int, tuple[BatchKVCache, list[list[RunningSequence]]]]]
        ] = {}
        for item in started:
            model = item.sequences[0].owner.weights.model
            caches = by_model.setdefault(id(model), (model, {}))[1]
            _, rows = caches.setdefault(
                id(item.cache), (item.cache, [[] for _ in range(item.cache.num_rows)])
            )
            rows[item.row].extend(item.sequences)
        for key, (model, caches) in by_model.items():
            group = self._groups.setdefault(key, DecodeGroup(model))
            group.cache.append_rows([(cache, [len(r) for r in rows]) for cache, rows in caches.values()])
            for _, rows in caches.values():
                for row in rows:
                    group.sequences.extend(row)

    def _start(self, admitted: list[RequestState]) -> list[Started]:
        """Prefill the admitted requests (batched) and sample each sample's first token.

        Returns, per request with samples still running, those samples and their prompt's cache row.
        A request whose prefill or first token fails is failed alone.
        """
        running = []
        for state in admitted:
            if state.future.cancelled():  # cancelled since it was admitted
                self._abandon(state, None)
            else:
                running.append(state)
        started = []
        for state, out in zip(running, self._prefill(running), strict=True):
            if isinstance(out, Exception):
                self._abandon(state, out)
                continue
            try:
                live = self._first_tokens(state, out)
            except Exception as exc:  # fails this request only
                logger.exception("first token failed")
                self._abandon(state, exc)
                continue
            if live:
                started.append(Started(out.cache, out.row, live))
        return started

    def _first_tokens(self, state: RequestState, out: PrefillOutput) -> list[RunningSequence]:
        """Take `state`'s prompt logprobs from its prefill, sample its samples' first tokens; the
        samples still running."""
        request = state.request
        # Copies: a cached prefill's lists are shared with every request that reuses it.
        if out.prompt_logprobs is not None:
            state.prompt_logprobs = list(out.prompt_logprobs)
        if out.topk_prompt_logprobs is not None:
            state.topk_prompt_logprobs = [None if r is None else list(r) for r in out.topk_prompt_logprobs]
        row = RowSampling(request.temperature, request.top_k, request.top_p)
        fallback = secrets.randbits(63)
        sequences = [
            RunningSequence(state, i, make_generator(request.seed, i, fallback + i), row)
            for i in range(request.num_samples)
        ]
        return self._advance(sequences, out.last_logits[None, :].expand(len(sequences), -1))

    def _prefill(self, states: list[RequestState]) -> list[PrefillOutput | Exception]:
        """Each request's prefill, in order: reused from the prompt cache when the same prompt ran
        recently or runs in this step, otherwise computed in batches (one forward pass per model,
        prompt-logprob need and batch of similar lengths)."""
        outputs: dict[int, PrefillOutput | Exception] = {}
        to_compute: dict[Hashable, list[RequestState]] = {}
        cache = self._prompt_cache
        for state in states:
            key = prefill_key(state)
            if cache is not None and (cached := cache.get(key)) is not None:
                state.prompt_cache_hit_tokens = len(state.request.prompt_tokens)
                outputs[id(state)] = cached
            elif cache is not None and key in to_compute:
                to_compute[key].append(state)  # an identical prompt in this step: share its prefill
            else:
                to_compute[key if cache is not None else (key, id(state))] = [state]
        batches: dict[tuple[int, bool], list[tuple[Hashable, PrefillPrompt]]] = {}
        for key, sharing in to_compute.items():
            request, weights = sharing[0].request, sharing[0].weights
            prompt = PrefillPrompt(
                request.prompt_tokens,
                weights.adapter_id,
                request.include_prompt_logprobs,
                request.topk_prompt_logprobs,
            )
            batches.setdefault((id(weights.model), prompt.wants_all_logits), []).append((key, prompt))
        for prompts in batches.values():
            model = to_compute[prompts[0][0]][0].weights.model
            lengths = [len(prompt.tokens) for _, prompt in prompts]
            for batch in prefill_batches(lengths, self._prefill_forward_cost_tokens):
                results = self._prefill_batch(model, [prompts[i][1] for i in batch])
                for i, out in zip(batch, results, strict=True):
                    key = prompts[i][0]
                    for n, state in enumerate(to_compute[key]):
                        outputs[id(state)] = out
                        if n > 0 and not isinstance(out, Exception):
                            state.prompt_cache_hit_tokens = len(state.request.prompt_tokens)
                    if (
                        cache is not None
                        and not isinstance(out, Exception)
                        and lengths[i] <= cache.max_tokens
                    ):
                        cache.put(key, out.detached(), lengths[i])  # its own row: the batch's buffers can go
        return [outputs[id(state)] for state in states]

    @staticmethod
    def _prefill_batch(model: nn.Module, prompts: list[PrefillPrompt]) -> list[PrefillOutput | Exception]:
        """`prefill_batch`, or if the batch fails, each prompt alone, so a failure fails only its own."""
        try:
            return list(prefill_batch(model, prompts))
        except Exception as exc:
            if len(prompts) == 1:
                logger.exception("prefill failed")
                return [exc]
            logger.warning(
                "batched prefill of %d prompts failed; prefilling them alone", len(prompts), exc_info=True
            )
        return [out for prompt in prompts for out in SamplingEngine._prefill_batch(model, [prompt])]

    def _forget_dropped_weights(self) -> None:
        """Drop cached prefills of weights that were unregistered and are no longer in use."""
        if self._prompt_cache is not None and self._weights.drops != self._seen_drops:
            self._seen_drops = self._weights.drops
            self._prompt_cache.evict_where(holds_retired_weights)

    def _drop_cancelled(self) -> None:
        """Take the samples of requests cancelled since the last look out of the running batch."""
        with self._cond:
            if self._cancels == self._cancels_seen_running:
                return
            self._cancels_seen_running = self._cancels
        for key, group in list(self._groups.items()):
            cancelled = {id(s.owner): s.owner for s in group.sequences if s.owner.future.cancelled()}
            if not cancelled:
                continue
            keep = [r for r, s in enumerate(group.sequences) if id(s.owner) not in cancelled]
            if keep:
                group.cache.select_rows(keep)
                group.sequences = [group.sequences[r] for r in keep]
            else:
                del self._groups[key]  # its KV buffers go with it
            for state in cancelled.values():
                self._abandon(state, None)

    def _decode_group(self, group: DecodeGroup) -> None:
        """One decode step for every sequence of `group`; finished ones leave the batch."""
        # A sequence feeds at most max_tokens - generated more tokens (its pending one included).
        group.cache.max_columns = group.cache.length + max(
            s.owner.request.max_tokens - len(s.tokens) for s in group.sequences
        )
        try:
            logits = decode(
                group.model,
                group.cache,
                [s.tokens[-1] for s in group.sequences],
                [s.owner.weights.adapter_id for s in group.sequences],
            )
            live = self._advance(group.sequences, logits)
            if len(live) < len(group.sequences):
                keep = {id(s) for s in live}
                group.cache.select_rows([r for r, s in enumerate(group.sequences) if id(s) in keep])
                group.sequences = live
        except Exception as exc:  # fails the requests this batch carried, nothing else
            logger.exception("decode step failed")
            self._groups.pop(id(group.model), None)
            for state in {id(s.owner): s.owner for s in group.sequences}.values():
                self._abandon(state, exc)
            return
        if not group.sequences:
            self._groups.pop(id(group.model), None)

    def _advance(self, sequences: list[RunningSequence], logits: torch.Tensor) -> list[RunningSequence]:
        """Sample one token per sequence from `logits`; finish those that stop; return the rest."""
        tokens = choose_tokens(logits, [s.row for s in sequences], [s.generator for s in sequences])
        all_logprobs = untempered_logprobs(logits)
        logprobs = all_logprobs.gather(1, tokens[:, None]).squeeze(1)
        k = max(s.owner.request.topk_sample_logprobs for s in sequences)
        top_values, top_ids = all_logprobs.topk(k, dim=-1) if k else (None, None)
        live = []
        for row, (sequence, token, logprob) in enumerate(
            zip(sequences, tokens.tolist(), logprobs.tolist(), strict=True)
        ):
            sequence.tokens.append(token)
            sequence.logprobs.append(logprob)
            if (
                (wanted := sequence.owner.request.topk_sample_logprobs)
                and top_ids is not None
                and top_values is not None
            ):
                pairs = zip(top_ids[row, :wanted].tolist(), top_values[row, :wanted].tolist(), strict=True)
                sequence.topk_logprobs.append(list(pairs))
            if sequence.owner.on_token is not None:
                self._notify(sequence)
            if sequence.owner.stop.is_met(sequence.tokens):
                self._finish(sequence, "stop")
            elif len(sequence.tokens) >= sequence.owner.request.max_tokens:
                self._finish(sequence, "length")
            else:
                live.append(sequence)
        return live

    @staticmethod
    def _notify(sequence: RunningSequence) -> None:
        """Hand the token just sampled to the request's `on_token`; a failing callback is dropped."""
        state = sequence.owner
        assert state.on_token is not None
        topk = sequence.topk_logprobs[-1] if state.request.topk_sample_logprobs else None
        try:
            state.on_token(sequence.index, sequence.tokens[-1], sequence.logprobs[-1], topk)
        except Exception:
            logger.exception("on_token callback failed; no more tokens are streamed to it")
            state.on_token = None

    # --- completion -------------------------------------------------------------------------------
    # Invariant: a request holds `unfinished` batch rows and reservations, and its weights while
    # unfinished > 0; each is given back exactly once, by `_finish` or by `_abandon`.
    def _finish(self, sequence: RunningSequence, stop_reason: StopReason) -> None:
        state = sequence.owner
        state.sequences[sequence.index] = SampledSequence(
            sequence.tokens,
            sequence.logprobs,
            stop_reason,
            sequence.topk_logprobs if state.request.topk_sample_logprobs else None,
        )
        state.unfinished -= 1
        self._release_slots(state, 1)
        if state.unfinished == 0:
            self._weights.release(state.weights)
            self._settle(
                state,
                SampleResult(
                    sequences=[s for s in state.sequences if s is not None],
                    prompt_logprobs=state.prompt_logprobs,
                    topk_prompt_logprobs=state.topk_prompt_logprobs,
                    prompt_cache_hit_tokens=state.prompt_cache_hit_tokens,
                ),
            )

    def _release_slots(self, state: RequestState, num_sequences: int) -> None:
        """Give back the batch rows and KV-cache reservation of `num_sequences` of `state`'s samples."""
        with self._cond:
            self._scheduler.release(state.request.reserved_tokens_per_sample * num_sequences, num_sequences)
            self._cond.notify_all()  # stats waiters

    def _abandon(self, state: RequestState, exc: BaseException | None) -> None:
        """Stop an admitted request: give back what its unfinished samples hold; fail it with `exc`
        (None: it was cancelled)."""
        if state.unfinished > 0:
            self._release_slots(state, state.unfinished)
            state.unfinished = 0
            self._weights.release(state.weights)
        self._settle(state, exc)

    def _forget_waiting(self, state: RequestState, exc: BaseException | None) -> None:
        """Drop a request that was never admitted (nothing reserved but its weights)."""
        state.unfinished = 0
        self._weights.release(state.weights)
        self._settle(state, exc)

    def _settle(self, state: RequestState, outcome: SampleResult | BaseException | None) -> None:
        """Complete `state`'s future with `outcome` (None: it was cancelled) unless its caller
        cancelled it first, and count how it ended; only the first call for a request counts."""
        if state.settled:
            return
        state.settled = True
        if isinstance(outcome, BaseException) and not isinstance(outcome, TetherError):
            wrapped = ServerError(f"sampling failed: {type(outcome).__name__}: {outcome}")
            wrapped.__cause__ = outcome
            outcome = wrapped
        kind = "cancelled"
        try:  # the caller may cancel at any moment, from any thread
            if isinstance(outcome, SampleResult):
                state.future.set_result(outcome)
                kind = "completed"
            elif outcome is not None:
                state.future.set_exception(outcome)
                kind = "failed"
        except InvalidStateError:
            pass
        with self._cond:
            self._outcomes[kind] += 1
            self._cond.notify_all()

    def _text_decoder(self) -> Callable[[Sequence[int]], str]:
        """Decode token ids to text for stop strings; the tokenizer is loaded on first need."""
        if self._decode_text is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(self._base.tokenizer_path))

            def decode_text(ids: Sequence[int]) -> str:
                # One flat id list decodes to one string (`decode` is typed for batches too).
                return cast(str, tokenizer.decode(list(ids), skip_special_tokens=False))

            self._decode_text = decode_text
        return self._decode_text
