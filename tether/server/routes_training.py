"""Training routes of the Tinker protocol: create, info, forward(_backward), optimizer, save, load.

Each asynchronous route validates what it can cheaply, then queues one operation on the model's
worker (in `seq_id` order) and answers `{"request_id", "model_id"}`. The operation calls the
training engine and returns the final payload: protobuf bytes for forward/forward_backward, JSON
otherwise. Errors inside it become failed futures; the engine guarantees a failed call changes
nothing, so the model stays usable.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from tether.server import checkpoint_files as ckpt
from tether.server.engine_convert import engine_data, float_metrics, numpy_outputs
from tether.server.errors import require
from tether.server.model_hosts import LiveModel, LiveSampler
from tether.server.operations import new_request_id, submit_to_worker
from tether.server.state import ServerState, request_owner, server_state
from tether.types.errors import UserInputError
from tether.types.proto import decode_forward_backward_request, encode_forward_backward_output

log = logging.getLogger("tether.server")
router = APIRouter(prefix="/api/v1")

SUPPORTED_LOSSES = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LoraConfigBody(_Body):
    rank: int = Field(32, ge=0, le=4096)
    seed: int | None = None
    alpha: float | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelRequest(_Body):
    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: str
    lora_config: LoraConfigBody | None = None
    optimizer_config: dict[str, Any] | None = None
    user_metadata: dict[str, Any] | None = None


class ModelIdRequest(_Body):
    model_id: str


class OptimStepRequest(_Body):
    model_id: str
    seq_id: int
    adam_params: dict[str, Any] | None = None
    optimizer_params: dict[str, Any] | None = None


class SaveWeightsRequest(_Body):
    model_id: str
    path: str
    seq_id: int
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, Any] | None = None


class SaveWeightsForSamplerRequest(_Body):
    model_id: str
    seq_id: int
    path: str | None = None
    sampling_session_seq_id: int | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"
    ttl_seconds: int | None = None
    user_metadata: dict[str, Any] | None = None


class SaveWeightsExternalRequest(_Body):
    model_id: str
    path: str
    seq_id: int
    ttl_seconds: int | None = None


class LoadWeightsRequest(_Body):
    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None


def _check_optimizer_config(config: dict[str, Any] | None) -> dict[str, Any]:
    config = config or {"type": "adamw"}
    if config.get("type", "adamw") != "adamw":
        raise UserInputError(f"optimizer {config.get('type')!r} is not supported (only adamw)", field="optimizer_config")
    return {"type": "adamw"}


def _lora_spec(body: LoraConfigBody | None) -> Any:
    """A `LoraSpec`, or None for full fine-tuning (no lora_config, or rank 0)."""
    from tether.engine.lora import LoraSpec

    if body is None or body.rank == 0:
        return None
    require(body.train_attn or body.train_mlp or body.train_unembed, "at least one train_* flag must be true",
            field="lora_config")
    kwargs: dict[str, Any] = {"rank": body.rank, "seed": body.seed, "train_attn": body.train_attn,
                              "train_mlp": body.train_mlp, "train_unembed": body.train_unembed}
    if body.alpha is not None:
        kwargs["alpha"] = body.alpha
    try:
        return LoraSpec(**kwargs)
    except (ValueError, UserInputError) as exc:
        raise UserInputError(str(exc), field="lora_config") from None


def _future_response(request_id: str, model_id: str) -> dict[str, str]:
    return {"request_id": request_id, "model_id": model_id}


def _create_once(state: ServerState, model: LiveModel, owner: str, run: Any, kind: str) -> str:
    """Queue a model's creating operation once per model id (retries get the first request id)."""
    stream = f"{model.model_id}#create"
    registry = state.hosts.sample_dedupe
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
async def create_model(body: CreateModelRequest, state: ServerState = Depends(server_state),
                       owner: str = Depends(request_owner)) -> dict[str, str]:
    state.catalogue.get_session(body.session_id, owner)
    host = state.hosts.host(body.base_model)
    spec = _lora_spec(body.lora_config)
    optimizer_config = _check_optimizer_config(body.optimizer_config)
    model_id = f"{body.session_id}:train:{body.model_seq_id}"
    lora_config = body.lora_config.model_dump(exclude_none=True) if body.lora_config is not None else {}
    model = LiveModel(model_id=model_id, owner=owner, session_id=body.session_id, host=host,
                      base_model=body.base_model, is_lora=spec is not None,
                      lora_rank=spec.rank if spec is not None else 0, lora_config=lora_config,
                      optimizer_config=optimizer_config)

    def run() -> dict[str, str]:
        host.training.create_model(model_id, lora=spec)
        state.catalogue.add_training_run(model_id, body.session_id, owner, base_model=body.base_model,
                                         is_lora=model.is_lora, lora_rank=model.lora_rank or None,
                                         lora_config=lora_config, user_metadata=body.user_metadata or {})
        return {"model_id": model_id, "type": "create_model"}

    return _future_response(_create_once(state, model, owner, run, "create"), model_id)


@router.post("/get_info")
async def get_info(body: ModelIdRequest, state: ServerState = Depends(server_state),
                   owner: str = Depends(request_owner)) -> dict[str, Any]:
    model = state.hosts.model(body.model_id, owner)
    base = model.host.base
    arch = getattr(base.model.config, "model_type", "unknown")
    return {
        "type": "get_info",
        "model_id": model.model_id,
        "model_data": {"arch": arch, "model_name": model.base_model, "tokenizer_id": str(base.tokenizer_path)},
        "is_lora": model.is_lora,
        "lora_rank": model.lora_rank if model.is_lora else None,
        "model_name": model.base_model,
        "optimizer_config": model.optimizer_config,
    }


@router.post("/forward_backward")
async def forward_backward(request: Request, state: ServerState = Depends(server_state),
                           owner: str = Depends(request_owner)) -> dict[str, str]:
    decoded = decode_forward_backward_request(await request.body(), request.headers.get("content-encoding"))
    model = state.hosts.model(decoded.model_id, owner)
    require(decoded.loss_fn in SUPPORTED_LOSSES,
            f"loss_fn {decoded.loss_fn!r} is not supported (supported: {', '.join(SUPPORTED_LOSSES)})", field="loss_fn")
    require(len(decoded.data) > 0, "at least one datum is required", field="data")
    for index, datum in enumerate(decoded.data):
        try:
            datum.input_tokens()
        except UserInputError as exc:
            raise UserInputError(exc.message, datum_index=index) from None
    engine_host = model.host

    def run() -> bytes:
        data = engine_data(decoded.data)
        engine = engine_host.training
        call = engine.forward if decoded.forward_only else engine.forward_backward
        result = call(model.model_id, data, decoded.loss_fn, decoded.loss_fn_config)
        return encode_forward_backward_output(numpy_outputs(result.outputs), float_metrics(result.metrics))

    request_id = submit_to_worker(state, engine_host.worker, owner=owner, stream=model.model_id,
                                  seq_id=decoded.seq_id, run=run, kind="fwd" if decoded.forward_only else "fwdbwd")
    return _future_response(request_id, model.model_id)


def _adam_params(body: OptimStepRequest) -> Any:
    from tether.engine.training_types import AdamWParams

    if body.optimizer_params is not None and body.adam_params is None:
        kind = body.optimizer_params.get("type", "unknown")
        raise UserInputError(f"optimizer {kind!r} is not supported (only adam)", field="optimizer_params")
    raw = dict(body.adam_params or {})
    known = set(AdamWParams.__dataclass_fields__)
    unknown = sorted(set(raw) - known - {"type"})
    require(not unknown, f"unknown fields {unknown}", field="adam_params")
    params = AdamWParams(**{k: v for k, v in raw.items() if k in known})
    params.validate()
    return params


@router.post("/optim_step")
async def optim_step(body: OptimStepRequest, state: ServerState = Depends(server_state),
                     owner: str = Depends(request_owner)) -> dict[str, str]:
    model = state.hosts.model(body.model_id, owner)
    params = _adam_params(body)
    host = model.host

    def run() -> dict[str, Any]:
        metrics = host.training.optim_step(model.model_id, params)
        return {"metrics": float_metrics(metrics), "type": "optim_step"}

    request_id = submit_to_worker(state, host.worker, owner=owner, stream=model.model_id, seq_id=body.seq_id,
                                  run=run, kind="optim")
    return _future_response(request_id, model.model_id)


def _check_free(state: ServerState, path: ckpt.CheckpointPath, *, overwrite: bool) -> None:
    if not overwrite and state.catalogue.find_checkpoint(path.run_id, path.checkpoint_id) is not None:
        raise UserInputError(f"checkpoint {path} already exists (pass overwrite=True to replace it)", field="path")


@router.post("/save_weights")
async def save_weights(body: SaveWeightsRequest, state: ServerState = Depends(server_state),
                       owner: str = Depends(request_owner)) -> dict[str, str]:
    model = state.hosts.model(body.model_id, owner)
    path = ckpt.CheckpointPath(model.model_id, "weights", ckpt.check_checkpoint_name(body.path))
    ttl = ckpt.check_ttl(body.ttl_seconds)
    _check_free(state, path, overwrite=body.overwrite)
    host = model.host
    directory = ckpt.checkpoint_directory(state.config.data_dir, owner, path)

    def run() -> dict[str, str]:
        _check_free(state, path, overwrite=body.overwrite)
        training_state = host.training.export_state(model.model_id, include_optimizer=True)
        size = ckpt.save_training_state(directory, training_state)
        state.catalogue.add_checkpoint(model.model_id, path.checkpoint_id, owner, checkpoint_type="training",
                                       directory=str(directory), size_bytes=size, ttl_seconds=ttl,
                                       user_metadata=body.user_metadata or {})
        return {"path": str(path), "type": "save_weights"}

    request_id = submit_to_worker(state, host.worker, owner=owner, stream=model.model_id, seq_id=body.seq_id,
                                  run=run, kind="save")
    return _future_response(request_id, model.model_id)


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


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(body: SaveWeightsForSamplerRequest, state: ServerState = Depends(server_state),
                                   owner: str = Depends(request_owner)) -> dict[str, str]:
    model = state.hosts.model(body.model_id, owner)
    host = model.host
    ttl = ckpt.check_ttl(body.ttl_seconds)
    if body.path is not None:
        path = ckpt.CheckpointPath(model.model_id, "sampler_weights", ckpt.check_checkpoint_name(body.path))
        directory = ckpt.checkpoint_directory(state.config.data_dir, owner, path)

        def run() -> dict[str, Any]:
            weights = host.training.sampler_weights(model.model_id)
            size = ckpt.save_sampler_weights(directory, weights)
            state.catalogue.add_checkpoint(model.model_id, path.checkpoint_id, owner, checkpoint_type="sampler",
                                           directory=str(directory), size_bytes=size, ttl_seconds=ttl,
                                           user_metadata=body.user_metadata or {})
            return {"path": str(path), "type": "save_weights_for_sampler"}
    else:
        require(body.sampling_session_seq_id is not None, "either path or sampling_session_seq_id is required",
                field="sampling_session_seq_id")
        sampler_id = f"{model.session_id}:sample:{body.sampling_session_seq_id}"

        def run() -> dict[str, Any]:
            if not state.hosts.has_sampler(sampler_id):
                weights = host.training.sampler_weights(model.model_id)
                register_sampler(state, sampler_id=sampler_id, owner=owner, session_id=model.session_id, host=host,
                                 base_model=model.base_model, model_path=None, weights=weights)
            return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

    request_id = submit_to_worker(state, host.worker, owner=owner, stream=model.model_id, seq_id=body.seq_id,
                                  run=run, kind="save-sampler")
    return _future_response(request_id, model.model_id)


@router.post("/save_weights_external")
async def save_weights_external(body: SaveWeightsExternalRequest, state: ServerState = Depends(server_state),
                                owner: str = Depends(request_owner)) -> dict[str, str]:
    model = state.hosts.model(body.model_id, owner)
    path = ckpt.CheckpointPath(model.model_id, "external_weights", ckpt.check_checkpoint_name(body.path))
    ttl = ckpt.check_ttl(body.ttl_seconds)
    host = model.host
    directory = ckpt.checkpoint_directory(state.config.data_dir, owner, path)

    def run() -> dict[str, Any]:
        weights = host.training.sampler_weights(model.model_id)
        size = ckpt.save_external_weights(directory, weights, host.base)
        state.catalogue.add_checkpoint(model.model_id, path.checkpoint_id, owner, checkpoint_type="external",
                                       directory=str(directory), size_bytes=size, ttl_seconds=ttl, user_metadata={})
        return {"path": str(path), "size_bytes": size, "type": "save_weights_external"}

    request_id = submit_to_worker(state, host.worker, owner=owner, stream=model.model_id, seq_id=body.seq_id,
                                  run=run, kind="save-external")
    return _future_response(request_id, model.model_id)


def resolve_training_checkpoint(state: ServerState, path_text: str, owner: str) -> tuple[ckpt.CheckpointPath, Any]:
    """The parsed path and catalogue row of a loadable training-state checkpoint owned by `owner`."""
    path = ckpt.parse_tinker_path(path_text)
    require(path.segment == "weights", "only training-state checkpoints (tinker://.../weights/<name>) can be loaded "
            "for training", field="path")
    row = state.catalogue.get_checkpoint(path.run_id, path.checkpoint_id, owner)
    return path, row


@router.post("/load_weights")
async def load_weights(body: LoadWeightsRequest, state: ServerState = Depends(server_state),
                       owner: str = Depends(request_owner)) -> dict[str, str]:
    path, row = resolve_training_checkpoint(state, body.path, owner)
    meta = ckpt.read_metadata(row.directory)
    include_optimizer = body.optimizer

    if body.model_id is not None:
        model = state.hosts.model(body.model_id, owner)
        require(meta.get("base_model") in (None, model.host.base.name, model.base_model),
                f"checkpoint is for base model {meta.get('base_model')!r}, not {model.base_model!r}", field="path")
        host = model.host

        def reload() -> dict[str, Any]:
            training_state = ckpt.load_training_state(row.directory, include_optimizer=include_optimizer)
            host.training.delete_model(model.model_id)
            host.training.import_state(model.model_id, training_state, include_optimizer=include_optimizer)
            return {"path": str(path), "model_id": model.model_id, "type": "load_weights"}

        request_id = submit_to_worker(state, host.worker, owner=owner, stream=model.model_id, seq_id=body.seq_id,
                                      run=reload, kind="load")
        return _future_response(request_id, model.model_id)

    require(body.session_id is not None and body.model_seq_id is not None,
            "either model_id or session_id and model_seq_id are required", field="model_id")
    state.catalogue.get_session(body.session_id, owner)
    run_row = state.catalogue.get_training_run(path.run_id, owner)
    base_model = body.base_model or run_row.base_model
    host = state.hosts.host(base_model)
    model_id = f"{body.session_id}:train:{body.model_seq_id}"
    lora = meta.get("lora") if meta.get("is_lora") else None
    model = LiveModel(model_id=model_id, owner=owner, session_id=body.session_id, host=host, base_model=base_model,
                      is_lora=bool(lora), lora_rank=int(lora["rank"]) if lora else 0,
                      lora_config=dict(run_row.lora_config or {}))

    def create_from_state() -> dict[str, Any]:
        training_state = ckpt.load_training_state(row.directory, include_optimizer=include_optimizer)
        host.training.import_state(model_id, training_state, include_optimizer=include_optimizer)
        state.catalogue.add_training_run(model_id, body.session_id, owner, base_model=base_model,
                                         is_lora=model.is_lora, lora_rank=model.lora_rank or None,
                                         lora_config=model.lora_config, user_metadata=body.user_metadata or {})
        return {"path": str(path), "model_id": model_id, "type": "load_weights"}

    return _future_response(_create_once(state, model, owner, create_from_state, "load"), model_id)

