"""Training routes of the Tinker protocol: create, info, forward(_backward), optimizer, save, load.

Each asynchronous route validates the request, builds one op (`tether.types.ops`) and submits it
to the base model's trainer in the model's `seq_id` order, answering `{"request_id", "model_id"}`.
Its `finish` turns the op's result into the final payload (protobuf bytes for forward and
forward_backward, JSON otherwise) and writes the catalogue rows, when the result arrives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from fastapi import APIRouter, Depends, Request

from tether.server.errors import require
from tether.server.live import LiveModel
from tether.server.operations import chain, new_request_id, submit_op
from tether.server.routes_tokenizer import client_tokenizer_id
from tether.server.sessions import CREATE_MODEL_SCOPE, free_sampler
from tether.server.state import ServerState, request_owner, server_state
from tether.trainer.interface import Trainer
from tether.types import ops, wire
from tether.types.errors import UserInputError
from tether.types.losses import get_loss_spec, resolve_loss_config
from tether.types.paths import (
    ParsedCheckpointPath,
    format_model_id,
    format_sampling_session_id,
    parse_checkpoint_path,
    validate_checkpoint_name,
)
from tether.types.proto import WireDatum, decode_forward_backward_request, encode_forward_backward_output
from tether.types.provenance import SequenceLookup, check_datum_spans, resolve_sampled_inputs

router = APIRouter(prefix="/api/v1")

T = TypeVar("T")

LARGE_BODY_BYTES = 256 * 1024
"""Bodies above this are decoded off the event loop (smaller ones cost less than the thread hop)."""


async def off_loop_if_large(size: int, work: Callable[[], T]) -> T:
    return await asyncio.to_thread(work) if size > LARGE_BODY_BYTES else work()


async def trainer_for(state: ServerState, base_model: str, *, field_name: str = "base_model") -> Trainer:
    """The base model's trainer; starting one (seconds) happens off the event loop."""
    state.trainers.check_served(base_model, field_name=field_name)
    trainer = state.trainers.started(base_model)
    if trainer is None:
        trainer = await asyncio.to_thread(state.trainers.get, base_model)
    return trainer


def decode_bounded(body: bytes, encoding: str | None, state: ServerState) -> Any:
    """The `ForwardBackwardRequest` body, decompressing and densifying to at most
    `max_decoded_body_bytes` (the request guard has bounded the body as sent)."""
    limit = state.config.max_decoded_body_bytes
    return decode_forward_backward_request(
        body, encoding, max_decompressed_bytes=limit, max_dense_bytes=limit
    )


def training_data(
    data: list[WireDatum], loss_fn: str = "cross_entropy", lookup: SequenceLookup | None = None
) -> list[ops.TrainingDatum]:
    """The op's datums: chunks flattened to tokens; a non-text chunk is a user error naming the datum.

    Provenance spans, when sent, must tile their fields (any loss). A loss that `needs_provenance`
    (stable_reinforce) gets its `logprobs` and `sampled_mask` from the sequences `lookup` finds.
    """
    require(len(data) > 0, "at least one datum is required", field="data")
    needs_provenance = get_loss_spec(loss_fn).needs_provenance
    out = []
    for index, datum in enumerate(data):
        tokens = datum.input_tokens(index)
        inputs = datum.loss_fn_inputs
        if needs_provenance:
            inputs = resolve_sampled_inputs(
                tokens,
                inputs,
                datum.model_input_spans,
                datum.loss_fn_input_spans,
                lookup or (lambda _: None),
                datum_index=index,
            )
        else:
            targets = inputs.get("target_tokens")
            check_datum_spans(
                datum.model_input_spans,
                datum.loss_fn_input_spans,
                input_length=int(tokens.shape[0]),
                target_length=int(targets.shape[0]) if targets is not None and targets.ndim == 1 else None,
                datum_index=index,
            )
        out.append(ops.TrainingDatum(input_tokens=tokens, loss_fn_inputs=inputs))
    return out


def encode_forward_output(result: ops.ForwardOutput) -> bytes:
    return encode_forward_backward_output(result.outputs, result.metrics)


def _optimizer_config(config: wire.OptimizerConfig | None) -> dict[str, Any]:
    if config is not None and config.type != "adamw":
        raise UserInputError(
            f"optimizer {config.type!r} is not supported (only adamw)", field="optimizer_config"
        )
    return {"type": "adamw"}


def _future(request_id: str, model_id: str) -> dict[str, str]:
    return {"request_id": request_id, "model_id": model_id}


def _create_once(
    state: ServerState,
    trainer: Trainer,
    model: LiveModel,
    owner: str,
    op: ops.Op,
    finish: Callable[[Any], Any],
    kind: str,
) -> str:
    """Submit a model's creating op once per model id: a retry, even a concurrent one, gets the first
    request id (a durable catalogue key, unique per `(owner, model_id)`). A failed creation releases it.

    The op runs after anything already queued for that model id (nothing, unless an earlier model of
    the same id is still being freed)."""
    scope = f"{CREATE_MODEL_SCOPE}{owner}"
    request_id = new_request_id(kind)
    earlier = state.catalogue.claim_idempotency_key(scope, model.model_id, request_id)
    if earlier is not None:
        return earlier

    def forget(_: object = None) -> None:
        state.live.remove_model(model.model_id)
        state.catalogue.release_idempotency_key(scope, model.model_id)

    state.live.add_model(model)
    try:
        source = trainer.submit(op, stream=model.model_id)
    except BaseException:
        forget()
        raise
    state.futures.add(request_id, owner, chain(state, source, finish, on_error=forget))
    return request_id


@router.post("/create_model")
async def create_model(
    body: wire.CreateModelRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, str]:
    state.catalogue.get_session(body.session_id, owner)
    lora = body.lora_config if body.lora_config is not None and body.lora_config.rank > 0 else None
    model_id = format_model_id(body.session_id, body.model_seq_id)
    lora_config = lora.model_dump(exclude_none=True) if lora is not None else {}
    model = LiveModel(
        model_id=model_id,
        owner=owner,
        session_id=body.session_id,
        base_model=body.base_model,
        is_lora=lora is not None,
        lora_rank=lora.rank if lora is not None else 0,
        lora_config=lora_config,
        optimizer_config=_optimizer_config(body.optimizer_config),
    )
    trainer = await trainer_for(state, body.base_model)

    def finish(_: ops.Done) -> dict[str, str]:
        state.catalogue.add_training_run(
            model_id,
            body.session_id,
            owner,
            base_model=body.base_model,
            is_lora=model.is_lora,
            lora_rank=model.lora_rank or None,
            lora_config=lora_config,
            user_metadata=body.user_metadata or {},
        )
        return {"model_id": model_id, "type": "create_model"}

    op = ops.CreateModel(model_id=model_id, lora_config=lora)
    return _future(_create_once(state, trainer, model, owner, op, finish, "create"), model_id)


@router.post("/get_info")
async def get_info(
    body: wire.GetInfoRequest, state: ServerState = Depends(server_state), owner: str = Depends(request_owner)
) -> dict[str, Any]:
    """`tokenizer_id`: the hub id where the model has one, else the trainer's tokenizer directory (which
    tether's SDK fetches from `/api/v1/tether/tokenizer/...` when it is not on the client's machine)."""
    model = state.live.model(body.model_id, owner)
    info = await asyncio.to_thread(state.trainers.base_info, model.base_model)
    return {
        "type": "get_info",
        "model_id": model.model_id,
        "model_data": {
            "arch": info.arch,
            "model_name": model.base_model,
            "tokenizer_id": client_tokenizer_id(state.config, model.base_model, Path(info.tokenizer_id)),
        },
        "is_lora": model.is_lora,
        "lora_rank": model.lora_rank if model.is_lora else None,
        "model_name": model.base_model,
        "optimizer_config": model.optimizer_config,
    }


@router.post("/forward_backward")
async def forward_backward(
    request: Request, state: ServerState = Depends(server_state), owner: str = Depends(request_owner)
) -> dict[str, str]:
    """Also serves `forward` (the SDK sends `forward_only`)."""
    body = await request.body()
    encoding = request.headers.get("content-encoding")

    def build() -> tuple[Any, ops.Forward | ops.ForwardBackward]:
        decoded = decode_bounded(body, encoding, state)
        resolve_loss_config(decoded.loss_fn, decoded.loss_fn_config)  # unknown loss or bad config: 400 now
        # resolve_loss_config refused every value that is not a finite number.
        config = cast("dict[str, float] | None", decoded.loss_fn_config)
        model = state.live.model(decoded.model_id, owner)
        lookup = state.stability.lookup(owner, model.session_id)
        op_type = ops.Forward if decoded.forward_only else ops.ForwardBackward
        return decoded, op_type(
            model_id=decoded.model_id,
            data=training_data(decoded.data, decoded.loss_fn, lookup),
            loss_fn=decoded.loss_fn,
            loss_fn_config=config,
        )

    decoded, op = await off_loop_if_large(len(body), build)
    model = state.live.model(decoded.model_id, owner)
    trainer = await trainer_for(state, model.base_model)
    submitted = time.perf_counter()

    def finish(result: ops.ForwardOutput) -> bytes:
        if not decoded.forward_only:  # the console's server-side curves
            state.run_metrics.observe_forward_backward(
                model.model_id, op.data, result.metrics, seconds=time.perf_counter() - submitted
            )
        return encode_forward_output(result)

    request_id = submit_op(
        state,
        trainer,
        op,
        owner=owner,
        kind="fwd" if decoded.forward_only else "fwdbwd",
        stream=model.model_id,
        seq_id=decoded.seq_id,
        finish=finish,
    )
    return _future(request_id, model.model_id)


@router.post("/optim_step")
async def optim_step(
    body: wire.OptimStepRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, str]:
    model = state.live.model(body.model_id, owner)
    if body.adam_params is None:
        kind = (body.optimizer_params or {}).get("type", "unknown")
        raise UserInputError(f"optimizer {kind!r} is not supported (only adam)", field="optimizer_params")
    trainer = await trainer_for(state, model.base_model)

    def finish(result: ops.MetricsOutput) -> dict[str, Any]:
        state.run_metrics.observe_optim_step(model.model_id, result.metrics)
        return {"metrics": result.metrics, "type": "optim_step"}

    request_id = submit_op(
        state,
        trainer,
        ops.OptimStep(
            model_id=model.model_id,
            adam_params=body.adam_params,
            grad_accumulation_normalization=(
                body.grad_accumulation_normalization or wire.GradAccNormalization.NONE
            ).value,
        ),
        owner=owner,
        kind="optim",
        stream=model.model_id,
        seq_id=body.seq_id,
        finish=finish,
        after=lambda _: state.catalogue.touch_training_run(model.model_id),
    )
    return _future(request_id, model.model_id)


def _checkpoint(model: LiveModel, kind: str, name: str | None) -> ParsedCheckpointPath:
    return ParsedCheckpointPath(model.model_id, kind, validate_checkpoint_name(name or ""))  # type: ignore[arg-type]


def _record_checkpoint(
    state: ServerState,
    model: LiveModel,
    owner: str,
    path: ParsedCheckpointPath,
    written: ops.CheckpointWritten,
    ttl_seconds: int | None,
    user_metadata: dict | None,
) -> None:
    state.catalogue.add_checkpoint(
        model.model_id,
        path.checkpoint_id,
        owner,
        checkpoint_type=path.kind,
        directory=written.directory,
        size_bytes=written.size_bytes,
        ttl_seconds=ttl_seconds,
        user_metadata=user_metadata or {},
    )


@router.post("/save_weights")
async def save_weights(
    body: wire.SaveWeightsRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, str]:
    """The SDK's `save_state`: training state with optimizer moments, under `weights/<name>`."""
    model = state.live.model(body.model_id, owner)
    path = _checkpoint(model, "training", body.path)
    trainer = await trainer_for(state, model.base_model)

    def finish(written: ops.CheckpointWritten) -> dict[str, str]:
        _record_checkpoint(state, model, owner, path, written, body.ttl_seconds, body.user_metadata)
        return {"path": path.tinker_path, "type": "save_weights"}

    op = ops.SaveState(model_id=model.model_id, owner=owner, path=path.tinker_path, overwrite=body.overwrite)
    request_id = submit_op(
        state, trainer, op, owner=owner, kind="save", stream=model.model_id, seq_id=body.seq_id, finish=finish
    )
    return _future(request_id, model.model_id)


def add_live_sampler(
    state: ServerState,
    *,
    sampler_id: str,
    owner: str,
    session_id: str,
    base_model: str,
    model_path: str | None,
    has_weights: bool,
) -> None:
    """Make a sampling session live once its weights (if any) are registered with the trainer."""
    from tether.server.live import LiveSampler

    state.live.add_sampler(
        LiveSampler(
            sampler_id=sampler_id,
            owner=owner,
            session_id=session_id,
            base_model=base_model,
            model_path=model_path,
            has_weights=has_weights,
        )
    )
    state.catalogue.add_sampler(sampler_id, session_id, owner, base_model=base_model, model_path=model_path)


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(
    body: wire.SaveWeightsForSamplerRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, str]:
    """Named: write sampler weights under `sampler_weights/<name>`. Ephemeral: start a sampling session."""
    model = state.live.model(body.model_id, owner)
    trainer = await trainer_for(state, model.base_model)
    finish: Callable[[Any], Any]
    if not body.is_ephemeral:
        path = _checkpoint(model, "sampler", body.path)
        op = ops.SaveSamplerWeights(
            model_id=model.model_id, kind="sampler", owner=owner, path=path.tinker_path
        )

        def finish(written: ops.CheckpointWritten) -> dict[str, Any]:
            _record_checkpoint(state, model, owner, path, written, body.ttl_seconds, body.user_metadata)
            return {"path": path.tinker_path, "type": "save_weights_for_sampler"}
    else:
        assert body.sampling_session_seq_id is not None  # the request's validator: no path, a seq id
        sampler_id = format_sampling_session_id(model.session_id, body.sampling_session_seq_id)
        op = ops.SaveSamplerWeights(
            model_id=model.model_id, kind="ephemeral", owner=owner, sampler_id=sampler_id
        )

        def finish(_: ops.Done) -> dict[str, Any]:
            if not state.live.has_sampler(sampler_id):
                add_live_sampler(
                    state,
                    sampler_id=sampler_id,
                    owner=owner,
                    session_id=model.session_id,
                    base_model=model.base_model,
                    model_path=None,
                    has_weights=True,
                )
            for old in state.live.add_ephemeral(
                model.model_id, sampler_id, state.config.max_samplers_per_model
            ):
                free_sampler(state, old)  # superseded: its frozen copy of the weights is released
            return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

    request_id = submit_op(
        state,
        trainer,
        op,
        owner=owner,
        kind="save-sampler",
        stream=model.model_id,
        seq_id=body.seq_id,
        finish=finish,
    )
    return _future(request_id, model.model_id)


@router.post("/save_weights_external")
async def save_weights_external(
    body: wire.SaveWeightsExternalRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, str]:
    """Hugging Face format (a PEFT adapter for LoRA), for use outside tether."""
    model = state.live.model(body.model_id, owner)
    path = _checkpoint(model, "external", body.path)
    trainer = await trainer_for(state, model.base_model)

    def finish(written: ops.CheckpointWritten) -> dict[str, Any]:
        _record_checkpoint(state, model, owner, path, written, body.ttl_seconds, None)
        return {"path": path.tinker_path, "size_bytes": written.size_bytes, "type": "save_weights_external"}

    op = ops.SaveSamplerWeights(model_id=model.model_id, kind="external", owner=owner, path=path.tinker_path)
    request_id = submit_op(
        state,
        trainer,
        op,
        owner=owner,
        kind="save-external",
        stream=model.model_id,
        seq_id=body.seq_id,
        finish=finish,
    )
    return _future(request_id, model.model_id)


@router.post("/load_weights")
async def load_weights(
    body: wire.LoadWeightsRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, str]:
    """Create a model from a training-state checkpoint, or (legacy) load one into an existing model."""
    path = parse_checkpoint_path(body.path)
    require(
        path.kind == "training",
        "training loads from a training-state checkpoint (tinker://.../weights/<name>)",
        field="path",
    )
    row = state.catalogue.get_checkpoint(path.training_run_id, path.checkpoint_id, owner)
    run_row = state.catalogue.get_training_run(path.training_run_id, row.owner)

    if body.model_id is not None:  # not body.creates_model: a legacy load into an existing model
        model = state.live.model(body.model_id, owner)
        require(
            run_row.base_model == model.base_model,
            f"checkpoint is for base model {run_row.base_model!r}, not {model.base_model!r}",
            field="path",
        )
        trainer = await trainer_for(state, model.base_model)
        op = ops.LoadState(
            model_id=model.model_id,
            owner=row.owner,
            path=path.tinker_path,
            include_optimizer=body.optimizer,
            create_model=False,
        )
        request_id = submit_op(
            state,
            trainer,
            op,
            owner=owner,
            kind="load",
            stream=model.model_id,
            seq_id=body.seq_id,
            finish=lambda _: {"path": path.tinker_path, "model_id": model.model_id, "type": "load_weights"},
        )
        return _future(request_id, model.model_id)

    # Create-via-load: the request's validator requires both.
    assert body.session_id is not None and body.model_seq_id is not None
    session_id = body.session_id
    state.catalogue.get_session(session_id, owner)
    base_model = body.base_model or run_row.base_model
    require(
        base_model == run_row.base_model,
        f"checkpoint is for base model {run_row.base_model!r}, not {base_model!r}",
        field="base_model",
    )
    model_id = format_model_id(session_id, body.model_seq_id)
    new_model = LiveModel(
        model_id=model_id,
        owner=owner,
        session_id=session_id,
        base_model=base_model,
        is_lora=run_row.is_lora,
        lora_rank=run_row.lora_rank or 0,
        lora_config=dict(run_row.lora_config or {}),
    )
    trainer = await trainer_for(state, base_model)

    def finish(_: ops.Done) -> dict[str, Any]:
        state.catalogue.add_training_run(
            model_id,
            session_id,
            owner,
            base_model=base_model,
            is_lora=new_model.is_lora,
            lora_rank=new_model.lora_rank or None,
            lora_config=new_model.lora_config,
            user_metadata=body.user_metadata or {},
        )
        return {"path": path.tinker_path, "model_id": model_id, "type": "load_weights"}

    op = ops.LoadState(
        model_id=model_id,
        owner=row.owner,
        path=path.tinker_path,
        include_optimizer=body.optimizer,
        create_model=True,
    )
    return _future(_create_once(state, trainer, new_model, owner, op, finish, "load"), model_id)
