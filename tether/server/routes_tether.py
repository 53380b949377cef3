"""tether's protocol extension: the one-pass custom loss (docs/ARCHITECTURE.md).

`forward_keep_graph` runs a forward and the trainer keeps its autograd graph under the request id;
the client computes d loss / d logprobs locally and sends them to `backward_from_logprob_grads`,
which back-propagates through the kept graph. That is one forward instead of the SDK's two. The
trainer frees a graph whose backward does not come within `custom_loss_graph_ttl_s` (checked
between ops), and its backward then fails.
"""

from __future__ import annotations

import math

import numpy as np
from fastapi import APIRouter, Depends, Request

from tether.server.errors import require
from tether.server.operations import new_request_id, submit_op
from tether.server.routes_training import (
    decode_bounded,
    encode_forward_output,
    off_loop_if_large,
    trainer_for,
    training_data,
)
from tether.server.state import ServerState, request_owner, server_state
from tether.types import ops, wire
from tether.types.paths import ParsedCheckpointPath, validate_checkpoint_name

router = APIRouter(prefix="/api/v1/tether")


@router.post("/forward_keep_graph")
async def forward_keep_graph(
    request: Request, state: ServerState = Depends(server_state), owner: str = Depends(request_owner)
) -> dict[str, str]:
    body = await request.body()
    encoding = request.headers.get("content-encoding")
    decoded = await off_loop_if_large(len(body), lambda: decode_bounded(body, encoding, state))
    model = state.live.model(decoded.model_id, owner)
    require(
        decoded.loss_fn == "cross_entropy", "forward_keep_graph uses loss_fn='cross_entropy'", field="loss_fn"
    )
    data = await off_loop_if_large(len(body), lambda: training_data(decoded.data))
    trainer = await trainer_for(state, model.base_model)
    graph_id = new_request_id("keep")
    op = ops.ForwardKeepGraph(
        model_id=model.model_id, data=data, graph_id=graph_id, ttl_s=state.config.custom_loss_graph_ttl_s
    )
    request_id = submit_op(
        state,
        trainer,
        op,
        owner=owner,
        kind="keep",
        stream=model.model_id,
        seq_id=decoded.seq_id,
        finish=encode_forward_output,
        request_id=graph_id,
    )
    return {"request_id": request_id, "model_id": model.model_id}


def logprob_grad_arrays(grads: list[wire.TensorDataJson]) -> list[np.ndarray]:
    """float32 arrays of the given shapes; a shape that disagrees with its data, or a non-finite
    value, is a user error naming the datum."""
    arrays = []
    for index, grad in enumerate(grads):
        array = np.asarray(grad.data, dtype=np.float32)
        if grad.shape is not None:
            require(
                all(isinstance(d, int) and d >= 0 for d in grad.shape),
                f"shape {grad.shape} has a negative dimension",
                field="logprob_grads",
                datum_index=index,
            )
            require(
                math.prod(grad.shape) == array.size,
                f"shape {grad.shape} does not match {array.size} values",
                field="logprob_grads",
                datum_index=index,
            )
            array = array.reshape(grad.shape)
        require(
            bool(np.isfinite(array).all()),
            "gradients must be finite",
            field="logprob_grads",
            datum_index=index,
        )
        arrays.append(array)
    return arrays


@router.post("/backward_from_logprob_grads")
async def backward_from_logprob_grads(
    body: wire.BackwardFromLogprobGradsRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, str]:
    model = state.live.model(body.model_id, owner)
    grads = logprob_grad_arrays(body.logprob_grads)
    trainer = await trainer_for(state, model.base_model)
    op = ops.BackwardFromLogprobGrads(model_id=model.model_id, graph_id=body.graph_id, logprob_grads=grads)
    request_id = submit_op(
        state,
        trainer,
        op,
        owner=owner,
        kind="backward",
        stream=model.model_id,
        seq_id=body.seq_id,
        finish=lambda result: {"metrics": result.metrics},
    )
    return {"request_id": request_id, "model_id": model.model_id}


@router.post("/save_weights_for_sampler_ext")
async def save_weights_for_sampler_ext(
    body: wire.SaveWeightsForSamplerExtRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, str]:
    """A sampler checkpoint in the run's chain (base, delta or merged base) that deployments hot-load."""
    model = state.live.model(body.model_id, owner)
    path = ParsedCheckpointPath(model.model_id, "sampler", validate_checkpoint_name(body.path))
    trainer = await trainer_for(state, model.base_model)

    def finish(written: ops.CheckpointWritten) -> dict[str, object]:
        state.catalogue.add_checkpoint(
            model.model_id,
            path.checkpoint_id,
            owner,
            checkpoint_type="sampler",
            directory=written.directory,
            size_bytes=written.size_bytes,
            ttl_seconds=body.ttl_seconds,
            user_metadata={"chain_checkpoint_type": written.checkpoint_type or ""},
        )
        return wire.SaveWeightsForSamplerExtResponse(
            path=written.path,
            checkpoint_type=written.checkpoint_type,
            stored_bytes=written.size_bytes,
            full_bytes=written.full_bytes or written.size_bytes,
        ).model_dump()

    op = ops.SaveWeightsForSamplerExt(
        model_id=model.model_id, owner=owner, path=path.tinker_path, checkpoint_type=body.checkpoint_type
    )
    request_id = submit_op(
        state,
        trainer,
        op,
        owner=owner,
        kind="save-ext",
        stream=model.model_id,
        seq_id=body.seq_id,
        finish=finish,
    )
    return {"request_id": request_id, "model_id": model.model_id}
