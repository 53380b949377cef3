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
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from tether.client.api_future import APIFuture, ClientFuture, completed_future
from tether.client.custom_loss import CustomLossFn, run_one_pass_custom_loss
from tether.client.session import ClientSession
from tether.client.wire_convert import forward_output_from_wire, to_wire_datum, validate_datums
from tether.types.data import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    OptimStepResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
)
from tether.types.errors import ServerError, UserInputError
from tether.types.proto import (
    ForwardBackwardRequestBody,
    decode_forward_backward_output,
    encode_forward_backward_request,
)

if TYPE_CHECKING:
    from tether.client.sampling_client import SamplingClient

T = TypeVar("T")

PROTOBUF_HEADERS = {"Content-Type": "application/x-protobuf"}


class _Turn:
    """One reserved `seq_id` and its place in the submission order."""

    def __init__(self, seq_id: int, previous: concurrent.futures.Future, mine: concurrent.futures.Future) -> None:
        self.seq_id = seq_id
        self._previous = previous
        self._mine = mine

    async def wait(self) -> None:
        """Wait until every earlier request of this client has been posted."""
        await asyncio.wrap_future(self._previous)

    def done(self) -> None:
        """Let the next request be posted (called whether or not this one's post succeeded)."""
        if not self._mine.done():
            self._mine.set_result(None)


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
        self, turns: list[_Turn], coro: Awaitable[T], description: str, future_cls: type[APIFuture] = APIFuture
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

    async def _submit_in_turn(self, turn: _Turn, path: str, **kwargs: Any) -> dict[str, Any]:
        await turn.wait()
        try:
            response = await self._session.transport.request("POST", path, **kwargs)
        finally:
            turn.done()
        return response.json()

    async def _forward_like(self, turn: _Turn, path: str, body: ForwardBackwardRequestBody) -> ForwardBackwardOutput:
        submitted = await self._submit_in_turn(
            turn, path, content=encode_forward_backward_request(body), headers=PROTOBUF_HEADERS
        )
        raw = await self._session.transport.retrieve_future(submitted["request_id"], expect_proto=True)
        return forward_output_from_wire(decode_forward_backward_output(raw))

    def _forward_request(
        self, data: list[Datum], loss_fn: str, loss_fn_config: dict[str, Any] | None, forward_only: bool, seq_id: int
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
        """Compute the loss and accumulate its gradients (applied by the next `optim_step`)."""
        return self._forward_call(data, loss_fn, loss_fn_config, forward_only=False)

    def _forward_call(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict[str, Any] | None, *, forward_only: bool
    ) -> APIFuture[ForwardBackwardOutput]:
        datums = validate_datums(data)
        if not isinstance(loss_fn, str):
            raise UserInputError(f"must be a loss name, got {type(loss_fn).__name__}", field="loss_fn")
        if loss_fn_config is not None and not (
            isinstance(loss_fn_config, dict)
            and all(isinstance(k, str) and isinstance(v, int | float | str) for k, v in loss_fn_config.items())
        ):
            raise UserInputError("must map names to numbers or strings", field="loss_fn_config")
        (turn,) = self._take_turns(1)
        body = self._forward_request(datums, loss_fn, loss_fn_config, forward_only, turn.seq_id)
        name = "forward" if forward_only else "forward_backward"
        return self._run([turn], self._forward_like(turn, "/api/v1/forward_backward", body), name)

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
            raise UserInputError(f"only 'logprobs' is supported, got {loss_type_input!r}", field="loss_type_input")
        datums = validate_datums(data)
        if not callable(loss_fn):
            raise UserInputError("must be callable", field="loss_fn")
        forward_datums = [_forward_datum(d, i) for i, d in enumerate(datums)]
        forward_turn, backward_turn = self._take_turns(2)
        forward_body = self._forward_request(forward_datums, "cross_entropy", None, True, forward_turn.seq_id)

        async def forward() -> tuple[str, ForwardBackwardOutput]:
            submitted = await self._submit_in_turn(
                forward_turn,
                "/api/v1/tether/forward_keep_graph",
                content=encode_forward_backward_request(forward_body),
                headers=PROTOBUF_HEADERS,
            )
            raw = await self._session.transport.retrieve_future(submitted["request_id"], expect_proto=True)
            return submitted["request_id"], forward_output_from_wire(decode_forward_backward_output(raw))

        async def backward(graph_id: str, grads: list[dict[str, Any]]) -> dict[str, float]:
            body = {
                "model_id": self.model_id,
                "seq_id": backward_turn.seq_id,
                "graph_id": graph_id,
                "logprob_grads": grads,
                "type": "backward_from_logprob_grads",
            }
            submitted = await self._submit_in_turn(
                backward_turn, "/api/v1/tether/backward_from_logprob_grads", json=body
            )
            result = await self._session.transport.retrieve_future(submitted["request_id"], expect_proto=False)
            if not isinstance(result, dict):
                raise ServerError("backward_from_logprob_grads returned a non-JSON result")
            return {k: float(v) for k, v in (result.get("metrics") or {}).items()}

        coro = run_one_pass_custom_loss(datums, loss_fn, forward, backward)
        return self._run([forward_turn, backward_turn], coro, "forward_backward_custom")

    def optim_step(
        self, optim_params: AdamParams | None = None, *, adam_params: AdamParams | None = None
    ) -> APIFuture[OptimStepResponse]:
        """Apply the accumulated gradients with AdamW and zero them."""
        params = AdamParams.coerce(adam_params if adam_params is not None else (optim_params or AdamParams()))
        (turn,) = self._take_turns(1)
        body = {"model_id": self.model_id, "seq_id": turn.seq_id, "adam_params": params.model_dump(), "type": "optim_step"}
        return self._run(
            [turn], self._json_op(turn, "/api/v1/optim_step", body, OptimStepResponse.model_validate), "optim_step"
        )

    async def _json_op(self, turn: _Turn, path: str, body: dict[str, Any], parse: Callable[[Any], T]) -> T:
        submitted = await self._submit_in_turn(turn, path, json=body)
        result = await self._session.transport.retrieve_future(submitted["request_id"], expect_proto=False)
        return parse(result)

    # ---- checkpoints

    def save_state(
        self, name: str, ttl_seconds: int | None = None, overwrite: bool = False, user_metadata: dict[str, str] | None = None
    ) -> APIFuture[SaveWeightsResponse]:
        """Save weights and optimizer state as `tinker://<model_id>/weights/<name>` (resumable)."""
        (turn,) = self._take_turns(1)
        body = _without_none(
            {
                "model_id": self.model_id,
                "path": name,
                "seq_id": turn.seq_id,
                "ttl_seconds": ttl_seconds,
                "overwrite": overwrite,
                "user_metadata": user_metadata,
                "type": "save_weights",
            }
        )
        return self._run(
            [turn], self._json_op(turn, "/api/v1/save_weights", body, SaveWeightsResponse.model_validate), "save_state"
        )

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None, user_metadata: dict[str, str] | None = None
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Save sampling weights as `tinker://<model_id>/sampler_weights/<name>`."""
        (turn,) = self._take_turns(1)
        body = _without_none(
            {
                "model_id": self.model_id,
                "path": name,
                "kind": "snapshot",
                "seq_id": turn.seq_id,
                "ttl_seconds": ttl_seconds,
                "user_metadata": user_metadata,
                "type": "save_weights_for_sampler",
            }
        )
        parse = SaveWeightsForSamplerResponse.model_validate
        return self._run(
            [turn], self._json_op(turn, "/api/v1/save_weights_for_sampler", body, parse), "save_weights_for_sampler"
        )

    def save_weights_and_get_sampling_client(
        self, name: str | None = None, retry_config: Any = None, kind: Literal["snapshot", "inflight"] = "snapshot"
    ) -> APIFuture[SamplingClient]:
        """Snapshot the current weights into a new sampling session and return its client."""
        from tether.client.sampling_client import SamplingClient

        (turn,) = self._take_turns(1)
        sampling_seq = self._session.next_sampling_session_seq_id()
        body = {
            "model_id": self.model_id,
            "sampling_session_seq_id": sampling_seq,
            "kind": kind,
            "seq_id": turn.seq_id,
            "type": "save_weights_for_sampler",
        }

        def parse(result: Any) -> SamplingClient:
            if not isinstance(result, dict) or not result.get("sampling_session_id"):
                raise ServerError("save_weights_for_sampler returned no sampling_session_id")
            return SamplingClient(self._session, str(result["sampling_session_id"]), self._base_model_name())

        return self._run(
            [turn],
            self._json_op(turn, "/api/v1/save_weights_for_sampler", body, parse),
            "save_weights_and_get_sampling_client",
            ClientFuture,
        )

    def create_sampling_client(self, model_path: str, retry_config: Any = None) -> APIFuture[SamplingClient]:
        from tether.client.sampling_client import create_sampling_client

        coro = create_sampling_client(self._session, model_path=model_path, base_model=None)
        return self._session.run(coro, "create_sampling_client", ClientFuture)

    # ---- metrics

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> APIFuture[None]:
        """Add `metrics` at `step` to the server's record of this run (the console draws them).

        `metrics` maps names to real numbers (NaN and infinities are left out); `step` is a
        non-negative int, or None for the run's current optimizer step as the server counts them.
        A non-number or a bad step raises UserInputError at once. A tether extension: a server
        without it answers 404 (NotFoundError from the future).
        """
        body = {"metrics": _finite_metrics(metrics), "step": _metrics_step(step)}
        path = f"/api/v1/tether/runs/{self.model_id}/metrics"

        async def post() -> None:
            await self._session.transport.post_json(path, body)

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
        """The model's tokenizer; a local `tokenizer_id` directory loads offline."""
        from tether.client.tokenizer import load_tokenizer

        return load_tokenizer(self._info.model_data.tokenizer_id or self._base_model_name())

    def get_info_future(self) -> APIFuture[GetInfoResponse]:
        return completed_future(self._info, "get_info")


def _forward_datum(datum: Datum, index: int) -> Datum:
    """The forward-only datum of a custom loss: targets, plus weights (zeros when absent).

    Other loss inputs stay on the client (they only feed the local loss function).
    """
    import numpy as np

    if "target_tokens" not in datum.loss_fn_inputs:
        raise UserInputError(
            "forward_backward_custom needs target_tokens", field="loss_fn_inputs.target_tokens", datum_index=index
        )
    targets = datum.loss_fn_inputs["target_tokens"]
    weights = datum.loss_fn_inputs.get("weights")
    if weights is None:
        weights_np = np.zeros(targets.shape, dtype=np.float32)
    else:
        weights_np = weights.to_numpy()
    return Datum(model_input=datum.model_input, loss_fn_inputs={"target_tokens": targets, "weights": weights_np})


def _without_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


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
