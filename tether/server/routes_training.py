"""Training routes of the Tinker protocol: create, info, forward(_backward), optimizer, save, load.

Each asynchronous route validates what it can cheaply, then queues one operation on the model's
worker (in `seq_id` order) and answers `{"request_id", "model_id"}`. The operation calls the
training engine and returns the final payload: protobuf bytes for forward/forward_backward, JSON
otherwise. Errors inside it become failed futures; the engine guarantees a failed call changes
nothing, so the model stays usable.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request

from tether.server.engine_convert import engine_data, float_metrics, numpy_outputs
from tether.server.errors import require
from tether.server.guard import decode_forward_backward_body  # hardening
from tether.server.model_hosts import LiveModel, LiveSampler, creation_stream
from tether.server.operations import new_request_id, submit_to_worker
from tether.server.state import ServerState, request_owner, server_state
from tether.types import wire
from tether.types.errors import UserInputError
from tether.types.paths import (
    ParsedCheckpointPath,
    format_model_id,
    format_sampling_session_id,
    parse_checkpoint_path,
    validate_checkpoint_name,
)
from tether.types.proto import encode_forward_backward_output

log = logging.getLogger("tether.server")
router = APIRouter(prefix="/api/v1")


def _optimizer_config(config: wire.OptimizerConfig | None) -> dict[str, Any]:
    if config is not None and config.type != "adamw":
        raise UserInputError(f"optimizer {config.type!r} is not supported (only adamw)", field="optimizer_config")
    return {"type": "adamw"}


def _lora_spec(config: wire.LoraConfig | None) -> Any:
    """A `LoraSpec`, or None for full fine-tuning (no lora_config, or rank 0)."""
    from tether.engine.lora import LoraSpec

    if config is None or config.rank == 0:
        return None
    try:
        return LoraSpec(rank=config.rank, seed=config.seed, train_attn=config.train_attn, train_mlp=config.train_mlp,
                        train_unembed=config.train_unembed)
    except (ValueError, UserInputError) as exc:
        raise UserInputError(str(exc), field="lora_config") from None


def _future(request_id: str, model_id: str) -> dict[str, str]:
    return {"request_id": request_id, "model_id": model_id}


def _create_once(state: ServerState, model: LiveModel, owner: str, run: Any, kind: str) -> str:
    """Queue a model's creating operation once per model id (a retry gets the first request id)."""
    stream = creation_stream(model.model_id)
    registry = state.hosts.dedupe
    request_id = new_request_id(kind)
    earlier = registry.claim(stream, 0, request_id)
    if earlier is not None:
        return earlier
    try:
        if state.hosts.has_model(model.model_id):
            raise UserInputError(f"model {model.model_id!r} already exists", field="model_seq_id")
        state.hosts.add_model(model)

        def create() -> Any:
            try:
                return run()
            except BaseException:
                state.hosts.remove_model(model.model_id)
                raise

        return submit_to_worker(state, model.host.worker, owner=owner, stream=model.model_id, seq_id=None,
                                run=create, kind=kind, request_id=request_id)
    except BaseException:
        registry.release(stream, 0)
        raise


@router.post("/create_model")
async def create_model(body: wire.CreateModelRequest, state: ServerState = Depends(server_state),
                       owner: str = Depends(request_owner)) -> dict[str, str]:
    state.catalogue.get_session(body.session_id, owner)
    host = state.hosts.host(body.base_model)
    spec = _lora_spec(body.lora_config)
    model_id = format_model_id(body.session_id, body.model_seq_id)
    lora_config = body.lora_config.model_dump(exclude_none=True) if spec is not None else {}
    model = LiveModel(model_id=model_id, owner=owner, session_id=body.session_id, host=host,
                      base_model=body.base_model, is_lora=spec is not None,
                      lora_rank=spec.rank if spec is not None else 0, lora_config=lora_config,
                      optimizer_config=_optimizer_config(body.optimizer_config))

    def run() -> dict[str, str]:
        host.training.create_model(model_id, lora=spec)
        state.catalogue.add_training_run(model_id, body.session_id, owner, base_model=body.base_model,
                                         is_lora=model.is_lora, lora_rank=model.lora_rank or None,
                                         lora_config=lora_config, user_metadata=body.user_metadata or {})
        return {"model_id": model_id, "type": "create_model"}

    return _future(_create_once(state, model, owner, run, "create"), model_id)


@router.post("/get_info")
async def get_info(body: wire.GetInfoRequest, state: ServerState = Depends(server_state),
                   owner: str = Depends(request_owner)) -> dict[str, Any]:
    """`tokenizer_id` is the local tokenizer directory, so `get_tokenizer()` works offline."""
    model = state.hosts.model(body.model_id, owner)
    base = model.host.base
    return {
        "type": "get_info",
        "model_id": model.model_id,
        "model_data": {"arch": getattr(base.model.config, "model_type", None), "model_name": model.base_model,
                       "tokenizer_id": str(base.tokenizer_path)},
        "is_lora": model.is_lora,
        "lora_rank": model.lora_rank if model.is_lora else None,
        "model_name": model.base_model,
        "optimizer_config": model.optimizer_config,
    }


@router.post("/forward_backward")
async def forward_backward(request: Request, state: ServerState = Depends(server_state),
                           owner: str = Depends(request_owner)) -> dict[str, str]:
    decoded = await decode_forward_backward_body(request, state.config)  # hardening: off the loop, bounded
    model = state.hosts.model(decoded.model_id, owner)
    from tether.engine.losses import resolve_loss_config

    resolve_loss_config(decoded.loss_fn, decoded.loss_fn_config)  # unknown loss or bad config: 400 before queueing
    require(len(decoded.data) > 0, "at least one datum is required", field="data")
    for index, datum in enumerate(decoded.data):
        try:
            datum.input_tokens()
        except UserInputError as exc:
            raise UserInputError(exc.message, datum_index=index) from None
    host = model.host

    def run() -> bytes:
        engine = host.training
        call = engine.forward if decoded.forward_only else engine.forward_backward
        result = call(model.model_id, engine_data(decoded.data), decoded.loss_fn, decoded.loss_fn_config)
        return encode_forward_backward_output(numpy_outputs(result.outputs), float_metrics(result.metrics))

    request_id = submit_to_worker(state, host.worker, owner=owner, stream=model.model_id, seq_id=decoded.seq_id,
                                  run=run, kind="fwd" if decoded.forward_only else "fwdbwd")
    return _future(request_id, model.model_id)


@router.post("/optim_step")
async def optim_step(body: wire.OptimStepRequest, state: ServerState = Depends(server_state),
                     owner: str = Depends(request_owner)) -> dict[str, str]:
    from tether.engine.training_types import AdamWParams

    model = state.hosts.model(body.model_id, owner)
    if body.adam_params is None:
        kind = (body.optimizer_params or {}).get("type", "unknown")
        raise UserInputError(f"optimizer {kind!r} is not supported (only adam)", field="optimizer_params")
    params = AdamWParams(**body.adam_params.model_dump())
    params.validate()
    host = model.host

    def run() -> dict[str, Any]:
        metrics = host.training.optim_step(model.model_id, params)
        state.catalogue.touch_training_run(model.model_id)
        return {"metrics": float_metrics(metrics), "type": "optim_step"}

    request_id = submit_to_worker(state, host.worker, owner=owner, stream=model.model_id, seq_id=body.seq_id,
                                  run=run, kind="optim")
    return _future(request_id, model.model_id)


def _checkpoint(model: LiveModel, kind: str, name: str | None) -> ParsedCheckpointPath:
    return ParsedCheckpointPath(model.model_id, kind, validate_checkpoint_name(name or ""))  # type: ignore[arg-type]


@router.post("/save_weights")
async def save_weights(body: wire.SaveWeightsRequest, state: ServerState = Depends(server_state),
                       owner: str = Depends(request_owner)) -> dict[str, str]:
    model = state.hosts.model(body.model_id, owner)
    path = _checkpoint(model, "training", body.path)
    host = model.host

    def run() -> dict[str, str]:
        training_state = host.training.export_state(model.model_id, include_optimizer=True)
        info = state.checkpoints.save_training_state(owner, path, training_state, overwrite=body.overwrite)
        state.catalogue.add_checkpoint(model.model_id, path.checkpoint_id, owner, checkpoint_type="training",
                                       directory=str(state.checkpoints.directory(owner, path)),
                                       size_bytes=info.size_bytes, ttl_seconds=body.ttl_seconds,
                                       user_metadata=body.user_metadata or {})
        return {"path": path.tinker_path, "type": "save_weights"}

    request_id = submit_to_worker(state, host.worker, owner=owner, stream=model.model_id, seq_id=body.seq_id,
                                  run=run, kind="save")
    return _future(request_id, model.model_id)


def register_sampler(state: ServerState, *, sampler_id: str, owner: str, session_id: str, host: Any,
                     base_model: str, model_path: str | None, weights: Any) -> None:
    """Make a sampling session live: register its weights (if any) with the host's sampling engine."""
    weights_id = None
    if weights is not None:
        weights_id = sampler_id
        if weights.lora_spec is not None:
            host.sampling.register_lora(weights_id, weights.lora_spec, weights.tensors)
        else:
            host.sampling.register_full(weights_id, weights.tensors)
    state.hosts.add_sampler(LiveSampler(sampler_id=sampler_id, owner=owner, session_id=session_id, host=host,
                                        base_model=base_model, model_path=model_path, weights_id=weights_id))
    state.catalogue.add_sampler(sampler_id, session_id, owner, base_model=base_model, model_path=model_path)


def _save_hf(state: ServerState, model: LiveModel, owner: str, path: ParsedCheckpointPath,
             ttl_seconds: int | None, user_metadata: dict | None) -> int:
    host = model.host
    weights = host.training.sampler_weights(model.model_id)
    info = state.checkpoints.save_hf_weights(owner, path, weights, host.base)
    state.catalogue.add_checkpoint(model.model_id, path.checkpoint_id, owner, checkpoint_type=path.kind,
                                   directory=str(state.checkpoints.directory(owner, path)),
                                   size_bytes=info.size_bytes, ttl_seconds=ttl_seconds,
                                   user_metadata=user_metadata or {})
    return info.size_bytes


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(body: wire.SaveWeightsForSamplerRequest, state: ServerState = Depends(server_state),
                                   owner: str = Depends(request_owner)) -> dict[str, str]:
    """Named: write sampler weights under `sampler_weights/<name>`. Ephemeral: start a sampling session."""
    model = state.hosts.model(body.model_id, owner)
    host = model.host
    if not body.is_ephemeral:
        path = _checkpoint(model, "sampler", body.path)

        def run() -> dict[str, Any]:
            _save_hf(state, model, owner, path, body.ttl_seconds, body.user_metadata)
            return {"path": path.tinker_path, "type": "save_weights_for_sampler"}
    else:
        sampler_id = format_sampling_session_id(model.session_id, body.sampling_session_seq_id)

        def run() -> dict[str, Any]:
            if not state.hosts.has_sampler(sampler_id):
                register_sampler(state, sampler_id=sampler_id, owner=owner, session_id=model.session_id, host=host,
                                 base_model=model.base_model, model_path=None,
                                 weights=host.training.sampler_weights(model.model_id))
            return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

    request_id = submit_to_worker(state, host.worker, owner=owner, stream=model.model_id, seq_id=body.seq_id,
                                  run=run, kind="save-sampler")
    return _future(request_id, model.model_id)


@router.post("/save_weights_external")
async def save_weights_external(body: wire.SaveWeightsExternalRequest, state: ServerState = Depends(server_state),
                                owner: str = Depends(request_owner)) -> dict[str, str]:
    """Hugging Face format (a PEFT adapter for LoRA), for use outside tether."""
    model = state.hosts.model(body.model_id, owner)
    path = _checkpoint(model, "external", body.path)

    def run() -> dict[str, Any]:
        size = _save_hf(state, model, owner, path, body.ttl_seconds, None)
        return {"path": path.tinker_path, "size_bytes": size, "type": "save_weights_external"}

    request_id = submit_to_worker(state, model.host.worker, owner=owner, stream=model.model_id, seq_id=body.seq_id,
                                  run=run, kind="save-external")
    return _future(request_id, model.model_id)


@router.post("/load_weights")
async def load_weights(body: wire.LoadWeightsRequest, state: ServerState = Depends(server_state),
                       owner: str = Depends(request_owner)) -> dict[str, str]:
    """Create a model from a training-state checkpoint, or (legacy) load one into an existing model."""
    path = parse_checkpoint_path(body.path)
    require(path.kind == "training", "training loads from a training-state checkpoint (tinker://.../weights/<name>)",
            field="path")
    row = state.catalogue.get_checkpoint(path.training_run_id, path.checkpoint_id, owner)
    run_row = state.catalogue.get_training_run(path.training_run_id, row.owner)
    include_optimizer = body.optimizer

    def read_state() -> Any:
        return state.checkpoints.load_training_state(row.owner, path, include_optimizer=include_optimizer)

    if not body.creates_model:
        model = state.hosts.model(body.model_id, owner)
        require(run_row.base_model == model.base_model,
                f"checkpoint is for base model {run_row.base_model!r}, not {model.base_model!r}", field="path")

        def reload() -> dict[str, Any]:
            model.host.training.import_state(model.model_id, read_state(), include_optimizer=include_optimizer)
            return {"path": path.tinker_path, "model_id": model.model_id, "type": "load_weights"}

        request_id = submit_to_worker(state, model.host.worker, owner=owner, stream=model.model_id,
                                      seq_id=body.seq_id, run=reload, kind="load")
        return _future(request_id, model.model_id)

    state.catalogue.get_session(body.session_id, owner)
    base_model = body.base_model or run_row.base_model
    require(base_model == run_row.base_model,
            f"checkpoint is for base model {run_row.base_model!r}, not {base_model!r}", field="base_model")
    host = state.hosts.host(base_model)
    model_id = format_model_id(body.session_id, body.model_seq_id)
    model = LiveModel(model_id=model_id, owner=owner, session_id=body.session_id, host=host, base_model=base_model,
                      is_lora=run_row.is_lora, lora_rank=run_row.lora_rank or 0,
                      lora_config=dict(run_row.lora_config or {}))

    def create_from_state() -> dict[str, Any]:
        host.training.import_state(model_id, read_state(), include_optimizer=include_optimizer)
        state.catalogue.add_training_run(model_id, body.session_id, owner, base_model=base_model,
                                         is_lora=model.is_lora, lora_rank=model.lora_rank or None,
                                         lora_config=model.lora_config, user_metadata=body.user_metadata or {})
        return {"path": path.tinker_path, "model_id": model_id, "type": "load_weights"}

    return _future(_create_once(state, model, owner, create_from_state, "load"), model_id)
