"""`TrainingClient`: drive one trainable model (forward, backward, optimizer, checkpoints).

Every method returns an `APIFuture` at once. Requests are numbered `seq_id = 1, 2, 3, ...` in call
order and *submitted* in that order (request n+1 is posted only after request n's post returned),
so calls may be pipelined freely (forward_backward and optim_step of step N+1 before step N's
results are read) and the server still executes them in call order. Results are awaited
concurrently, after the submission turn has been passed on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from tether.client import routes
from tether.client.api_future import APIFuture, ClientFuture, completed_future
from tether.client.custom_loss import CustomLossFn, run_one_pass_custom_loss
from tether.client.routes import Route
from tether.client.session import ClientSession
from tether.client.wire_convert import to_wire_datum, validate_datums
from tether.types.data import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    GradAccNormalization,
    OptimStepResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    TensorData,
)
from tether.types.errors import ServerError, UserInputError
from tether.types.proto import ForwardBackwardRequestBody
from tether.types.wire import (
    BackwardFromLogprobGradsRequest,
    LogMetricsRequest,
    OptimStepRequest,
    SaveWeightsForSamplerExtRequest,
    SaveWeightsForSamplerExtResponse,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
    TensorDataJson,
    WireModel,
    make_wire,
)

if TYPE_CHECKING:
    from tether.client.sampling_client import SamplingClient

T = TypeVar("T")


class _Turn:
    """One reserved `seq_id` and its place in the submission order (a `transport.Turn`)."""

    def __init__(
        self, seq_id: int, previous: concurrent.futures.Future, mine: concurrent.futures.Future
    ) -> None:
        self.seq_id = seq_id
        self._previous = previous
        self._mine = mine

    async def wait(self) -> None:
        """Wait until every earlier request of this client has been posted."""
        await asyncio.wrap_future(self._previous)

    def done(self) -> None:
        """Let the next request be posted once the earlier ones have been (whether or not this
        one's post succeeded): a request that fails early never lets a later one overtake."""
        self._previous.add_done_callback(self._release)

    def _release(self, _previous: concurrent.futures.Future) -> None:
        try:
            self._mine.set_result(None)
        except concurrent.futures.InvalidStateError:
            pass  # released already


class TrainingClient:
    """A trainable model on the server: LoRA adapters, or all weights when created with rank 0."""

    def __init__(self, session: ClientSession, model_id: str, info: GetInfoResponse) -> None:
        self._session = session
        self.model_id = model_id
        self._info = info
        self._seq = itertools.count(1)
        self._turn_lock = threading.Lock()
        first: concurrent.futures.Future = concurrent.futures.Future()
        first.set_result(None)
        self._last_turn = first

    # ---- ordering

    def _take_turns(self, count: int) -> list[_Turn]:
        with self._turn_lock:
            turns = []
            for _ in range(count):
                mine: concurrent.futures.Future = concurrent.futures.Future()
                turns.append(_Turn(next(self._seq), self._last_turn, mine))
                self._last_turn = mine
            return turns

    def _run(
        self,
        turns: list[_Turn],
        coro: Awaitable[T],
        description: str,
        future_cls: type[APIFuture] = APIFuture,
    ) -> APIFuture[T]:
        async def guarded() -> T:
            try:
                return await coro
            finally:
                for turn in turns:
                    turn.done()

        try:
            return self._session.run(guarded(), description, future_cls)
        except BaseException:
            for turn in turns:
                turn.done()
            raise

    def _in_order(
        self, route: Route[T], body: WireModel, description: str, future_cls: type[APIFuture] = APIFuture
    ) -> APIFuture[T]:
        """Number `body` (already validated, so a bad call burns no seq_id) and send it in turn."""
        (turn,) = self._take_turns(1)
        numbered = body.model_copy(update={"seq_id": turn.seq_id})
        return self._run(
            [turn], self._session.transport.call(route, numbered, turn=turn), description, future_cls
        )

    def _forward_request(
        self,
        data: list[Datum],
        loss_fn: str,
        loss_fn_config: dict[str, Any] | None,
        forward_only: bool,
        seq_id: int,
    ) -> ForwardBackwardRequestBody:
        return ForwardBackwardRequestBody(
            model_id=self.model_id,
            seq_id=seq_id,
            forward_only=forward_only,
            loss_fn=loss_fn,
            loss_fn_config=loss_fn_config,
            data=[to_wire_datum(d) for d in data],
        )

    # ---- training

    def forward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict[str, Any] | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        """Compute the loss and per-datum outputs (e.g. `logprobs`) without touching gradients."""
        return self._forward_call(data, loss_fn, loss_fn_config, forward_only=True)

    def forward_backward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict[str, Any] | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        """Compute the loss and accumulate its gradients (applied by the next `optim_step`).

        For cross_entropy the metrics also hold `response_tokens` (= the server's
        `response_tokens:sum`, the target positions with a non-zero weight), so the mean NLL is
        `loss:sum / response_tokens`, as in the Fireworks SDK.
        """
        return self._forward_call(data, loss_fn, loss_fn_config, forward_only=False)

    def _forward_call(
        self,
        data: Sequence[Datum],
        loss_fn: str,
        loss_fn_config: dict[str, Any] | None,
        *,
        forward_only: bool,
    ) -> APIFuture[ForwardBackwardOutput]:
        datums = validate_datums(data)
        if not isinstance(loss_fn, str):
            raise UserInputError(f"must be a loss name, got {type(loss_fn).__name__}", field="loss_fn")
        if loss_fn_config is not None and not (
            isinstance(loss_fn_config, dict)
            and all(
                isinstance(k, str) and isinstance(v, int | float | str) for k, v in loss_fn_config.items()
            )
        ):
            raise UserInputError("must map names to numbers or strings", field="loss_fn_config")
        (turn,) = self._take_turns(1)
        body = self._forward_request(datums, loss_fn, loss_fn_config, forward_only, turn.seq_id)
        call = self._session.transport.call(routes.FORWARD_BACKWARD, body, turn=turn)
        if loss_fn == "cross_entropy":
            call = _with_response_tokens(call)
        return self._run([turn], call, "forward" if forward_only else "forward_backward")

    def forward_backward_custom(
        self, data: Sequence[Datum], loss_fn: CustomLossFn, *, loss_type_input: str | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        """Train on a loss computed locally by `loss_fn(data, logprobs_list) -> (loss, metrics)`.

        One forward pass on the server (tether extension): the server keeps the forward's graph,
        the loss and d loss / d logprobs are computed here with torch, and the gradients are sent
        back for the backward. Gradients equal those of the two-pass method of the Tinker SDK.
        The result's metrics hold the user's metrics, `loss:sum` (the custom loss) and the
        backward's metrics.
        """
        if loss_type_input not in (None, "logprobs"):
            raise UserInputError(
                f"only 'logprobs' is supported, got {loss_type_input!r}", field="loss_type_input"
            )
        datums = validate_datums(data)
        if not callable(loss_fn):
            raise UserInputError("must be callable", field="loss_fn")
        forward_datums = [_forward_datum(d, i) for i, d in enumerate(datums)]
        forward_turn, backward_turn = self._take_turns(2)
        forward_body = self._forward_request(forward_datums, "cross_entropy", None, True, forward_turn.seq_id)
        transport = self._session.transport

        async def forward() -> routes.KeptGraph:
            return await transport.call(routes.FORWARD_KEEP_GRAPH, forward_body, turn=forward_turn)

        async def backward(graph_id: str, grads: list[TensorDataJson]) -> dict[str, float]:
            body = BackwardFromLogprobGradsRequest(
                model_id=self.model_id, seq_id=backward_turn.seq_id, graph_id=graph_id, logprob_grads=grads
            )
            answer = await transport.call(routes.BACKWARD_FROM_LOGPROB_GRADS, body, turn=backward_turn)
            return answer.metrics

        coro = run_one_pass_custom_loss(datums, loss_fn, forward, backward)
        return self._run([forward_turn, backward_turn], coro, "forward_backward_custom")

    def optim_step(
        self,
        optim_params: AdamParams | None = None,
        *,
        adam_params: AdamParams | None = None,
        grad_accumulation_normalization: GradAccNormalization | str | None = None,
    ) -> APIFuture[OptimStepResponse]:
        """Apply the accumulated gradients with AdamW and zero them.

        `grad_accumulation_normalization` (Fireworks' keyword; `GradAccNormalization`, its value or
        name, or None) divides the gradients accumulated since the last step by their loss tokens
        ("num_loss_tokens") or sequences ("num_sequences") before clipping and the update; None or
        "none" leaves them as they are. An unknown value raises UserInputError here (nothing sent).
        """
        params = AdamParams.coerce(adam_params if adam_params is not None else (optim_params or AdamParams()))
        mode = GradAccNormalization.coerce(grad_accumulation_normalization)
        body = OptimStepRequest(
            model_id=self.model_id,
            adam_params=params,
            grad_accumulation_normalization=None if mode is GradAccNormalization.NONE else mode,
        )
        return self._in_order(routes.OPTIM_STEP, body, "optim_step")

    # ---- checkpoints

    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> APIFuture[SaveWeightsResponse]:
        """Save weights and optimizer state as `tinker://<model_id>/weights/<name>` (resumable).

        Raises UserInputError at once for an invalid value (e.g. a TTL under an hour).
        """
        body = make_wire(
            SaveWeightsRequest,
            model_id=self.model_id,
            path=name,
            ttl_seconds=ttl_seconds,
            overwrite=overwrite,
            user_metadata=user_metadata,
        )
        return self._in_order(routes.SAVE_WEIGHTS, body, "save_state")

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None, user_metadata: dict[str, str] | None = None
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Save sampling weights as `tinker://<model_id>/sampler_weights/<name>`.

        Raises UserInputError at once for an invalid value (e.g. a TTL under an hour).
        """
        body = make_wire(
            SaveWeightsForSamplerRequest,
            model_id=self.model_id,
            path=name,
            ttl_seconds=ttl_seconds,
            user_metadata=user_metadata,
        )
        return self._in_order(routes.SAVE_WEIGHTS_FOR_SAMPLER, body, "save_weights_for_sampler")

    def save_weights_for_sampler_ext(
        self,
        name: str,
        checkpoint_type: Literal["base", "delta", "merged_base"] | None = None,
        ttl_seconds: int | None = None,
    ) -> APIFuture[SaveWeightsForSamplerExtResponse]:
        """Save sampling weights into the run's checkpoint chain, for deployments to hot-load
        (fireworks-training-api.md §4.2): `"base"` (full weights), `"delta"` (an exact diff against the
        run's previous chain checkpoint, about ten times smaller), `"merged_base"` (a LoRA folded into
        full weights), or None (a base first, deltas after). A tether extension.
        """
        body = make_wire(
            SaveWeightsForSamplerExtRequest,
            model_id=self.model_id,
            path=name,
            checkpoint_type=checkpoint_type,
            ttl_seconds=ttl_seconds,
        )
        return self._in_order(routes.SAVE_WEIGHTS_FOR_SAMPLER_EXT, body, "save_weights_for_sampler_ext")

    def save_weights_and_get_sampling_client(
        self,
        name: str | None = None,
        retry_config: Any = None,
        kind: Literal["snapshot", "inflight"] = "snapshot",
        record_stability_info: bool = False,
    ) -> APIFuture[SamplingClient]:
        """Snapshot the current weights into a new sampling session and return its client
        (`record_stability_info`: its samples can be trained on with stable_reinforce)."""
        body = make_wire(
            SaveWeightsForSamplerRequest,
            model_id=self.model_id,
            sampling_session_seq_id=self._session.next_sampling_session_seq_id(),
            kind=kind,
        )
        (turn,) = self._take_turns(1)
        numbered = body.model_copy(update={"seq_id": turn.seq_id})

        async def run() -> SamplingClient:
            from tether.client.sampling_client import SamplingClient

            answer = await self._session.transport.call(
                routes.SAVE_WEIGHTS_FOR_SAMPLING_SESSION, numbered, turn=turn
            )
            if not answer.sampling_session_id:
                raise ServerError("save_weights_for_sampler returned no sampling_session_id")
            return SamplingClient(
                self._session,
                answer.sampling_session_id,
                self._base_model_name(),
                record_stability_info=record_stability_info,
            )

        return self._run([turn], run(), "save_weights_and_get_sampling_client", ClientFuture)

    def create_sampling_client(
        self, model_path: str, retry_config: Any = None, record_stability_info: bool = False
    ) -> APIFuture[SamplingClient]:
        from tether.client.sampling_client import create_sampling_client

        coro = create_sampling_client(
            self._session, model_path=model_path, base_model=None, record_stability_info=record_stability_info
        )
        return self._session.run(coro, "create_sampling_client", ClientFuture)

    # ---- metrics

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> APIFuture[None]:
        """Add `metrics` at `step` to the server's record of this run (the console draws them).

        `metrics` maps names to real numbers (NaN and infinities are left out); `step` is a
        non-negative int, or None for the run's current optimizer step as the server counts them.
        A non-number or a bad step raises UserInputError at once. A tether extension: a server
        without it answers 404 (NotFoundError from the future).
        """
        body = make_wire(LogMetricsRequest, metrics=_finite_metrics(metrics), step=_metrics_step(step))
        route = routes.LOG_METRICS.at(run_id=self.model_id)

        async def post() -> None:
            await self._session.transport.call(route, body)

        return self._session.run(post(), "log_metrics")

    # ---- information

    def get_info(self) -> GetInfoResponse:
        """The model's info as fetched at creation (no server call)."""
        return self._info

    def _base_model_name(self) -> str:
        name = self._info.model_data.model_name or self._info.model_name
        if not name:
            raise ServerError("get_info returned no model_name")
        return name

    def get_tokenizer(self) -> Any:
        """The model's tokenizer: a local directory, else the server's files (cached), else the hub id."""
        from tether.client.tokenizer import load_tokenizer

        base_model = self._base_model_name()
        return load_tokenizer(
            self._info.model_data.tokenizer_id or base_model, session=self._session, base_model=base_model
        )

    def get_info_future(self) -> APIFuture[GetInfoResponse]:
        return completed_future(self._info, "get_info")


def _forward_datum(datum: Datum, index: int) -> Datum:
    """The forward-only datum of a custom loss: targets, plus weights (zeros when absent).

    Other loss inputs stay on the client (they only feed the local loss function).
    """
    import numpy as np

    if "target_tokens" not in datum.loss_fn_inputs:
        raise UserInputError(
            "forward_backward_custom needs target_tokens",
            field="loss_fn_inputs.target_tokens",
            datum_index=index,
        )
    targets = datum.loss_fn_inputs["target_tokens"]
    weights = datum.loss_fn_inputs.get("weights")
    if weights is None:
        weights_np = np.zeros(targets.shape, dtype=np.float32)
    else:
        weights_np = weights.to_numpy()
    return Datum(
        model_input=datum.model_input,
        loss_fn_inputs={"target_tokens": targets, "weights": TensorData.from_numpy(weights_np)},
    )


def _finite_metrics(metrics: Any) -> dict[str, float]:
    import math
    import numbers

    if not isinstance(metrics, dict):
        raise UserInputError(f"must map names to numbers, got {type(metrics).__name__}", field="metrics")
    clean = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise UserInputError(f"metric names must be non-empty strings, got {name!r}", field="metrics")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise UserInputError(f"must be a number, got {type(value).__name__}", field=f"metrics.{name}")
        if math.isfinite(value):
            clean[name] = float(value)
    return clean


def _metrics_step(step: Any) -> int | None:
    import numbers

    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise UserInputError(f"must be a non-negative integer, got {step!r}", field="step")
    return int(step)


async def _with_response_tokens(call: Awaitable[ForwardBackwardOutput]) -> ForwardBackwardOutput:
    """A cross_entropy answer with `response_tokens` beside the server's `response_tokens:sum`."""
    output = await call
    if "response_tokens:sum" in output.metrics:
        output.metrics.setdefault("response_tokens", output.metrics["response_tokens:sum"])
    return output
