"""tether's protocol extension: the one-pass custom loss (docs/INTERFACES.md).

`forward_keep_graph` runs a forward and keeps its autograd graph under the request id; the client
computes d loss / d logprobs locally and sends them to `backward_from_logprob_grads`, which
back-propagates through the kept graph. That is one forward instead of the SDK's two. A graph whose
backward does not come within `custom_loss_graph_ttl_s` is freed, and its backward then fails.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request

from tether.server.engine_convert import engine_data, float_metrics, numpy_outputs
from tether.server.errors import require
from tether.server.guard import decode_forward_backward_body  # hardening
from tether.server.operations import new_request_id, submit_to_worker
from tether.server.state import ServerState, request_owner, server_state
from tether.types import wire
from tether.types.errors import UserInputError
from tether.types.proto import encode_forward_backward_output

router = APIRouter(prefix="/api/v1/tether")


@dataclass
class KeptGraph:
    handle: Any
    owner: str
    model_id: str
    shapes: list[tuple[int, ...]]
    timer: threading.Timer | None = None


def _release(state: ServerState, graph_id: str) -> None:
    """Free a kept graph on its model's worker (the engine is used from that thread only)."""
    kept = state.kept_graphs.pop(graph_id, None)
    if kept is None:
        return
    if kept.timer is not None:
        kept.timer.cancel()
    try:
        model = state.hosts.model(kept.model_id, kept.owner)
    except Exception:  # noqa: BLE001 - the model is gone, and its graphs with it
        return
    model.host.worker.submit(kept.model_id, None, new_request_id("release"),
                             lambda: model.host.training.release_graph(kept.handle))


@router.post("/forward_keep_graph")
async def forward_keep_graph(request: Request, state: ServerState = Depends(server_state),
                             owner: str = Depends(request_owner)) -> dict[str, str]:
    decoded = await decode_forward_backward_body(request, state.config)  # hardening: off the loop, bounded
    model = state.hosts.model(decoded.model_id, owner)
    require(decoded.loss_fn == "cross_entropy", "forward_keep_graph uses loss_fn='cross_entropy'", field="loss_fn")
    require(len(decoded.data) > 0, "at least one datum is required", field="data")
    host = model.host
    request_id = new_request_id("keep")
    ttl_s = state.config.custom_loss_graph_ttl_s

    def run() -> bytes:
        handle, result = host.training.forward_keep_graph(model.model_id, engine_data(decoded.data))
        shapes = [tuple(out["logprobs"].shape) for out in result.outputs]
        kept = KeptGraph(handle, owner, model.model_id, shapes)
        kept.timer = threading.Timer(ttl_s, _release, args=(state, request_id))
        kept.timer.daemon = True
        state.kept_graphs[request_id] = kept
        kept.timer.start()
        return encode_forward_backward_output(numpy_outputs(result.outputs), float_metrics(result.metrics))

    rid = submit_to_worker(state, host.worker, owner=owner, stream=model.model_id, seq_id=decoded.seq_id, run=run,
                           kind="keep", request_id=request_id)
    return {"request_id": rid, "model_id": model.model_id}


@router.post("/backward_from_logprob_grads")
async def backward_from_logprob_grads(body: wire.BackwardFromLogprobGradsRequest, state: ServerState = Depends(server_state),
                                      owner: str = Depends(request_owner)) -> dict[str, str]:
    model = state.hosts.model(body.model_id, owner)
    host = model.host
    grads_np = []
    for index, grad in enumerate(body.logprob_grads):
        array = np.asarray(grad.data, dtype=np.float32)
        if grad.shape is not None:
            require(int(np.prod(grad.shape)) == array.size, f"shape {grad.shape} does not match {array.size} values",
                    field="logprob_grads", datum_index=index)
            array = array.reshape(grad.shape)
        require(bool(np.isfinite(array).all()), "gradients must be finite", field="logprob_grads", datum_index=index)
        grads_np.append(array)

    def run() -> dict[str, Any]:
        import torch

        kept = state.kept_graphs.get(body.graph_id)
        if kept is None or kept.owner != owner or kept.model_id != model.model_id:
            raise UserInputError(f"no kept graph {body.graph_id!r} (its backward came too late, or it was used)",
                                 field="graph_id")
        if len(grads_np) != len(kept.shapes):
            raise UserInputError(f"expected {len(kept.shapes)} gradients, got {len(grads_np)}", field="logprob_grads")
        grads = []
        for index, (array, shape) in enumerate(zip(grads_np, kept.shapes, strict=True)):
            if array.size != int(np.prod(shape)):
                raise UserInputError(f"expected shape {list(shape)}, got {list(array.shape)}", field="logprob_grads",
                                     datum_index=index)
            grads.append(torch.from_numpy(array.reshape(shape)))
        metrics = host.training.backward_from_logprob_grads(kept.handle, grads)
        state.kept_graphs.pop(body.graph_id, None)
        if kept.timer is not None:
            kept.timer.cancel()
        return {"metrics": float_metrics(metrics)}

    request_id = submit_to_worker(state, host.worker, owner=owner, stream=model.model_id, seq_id=body.seq_id, run=run,
                                  kind="backward")
    return {"request_id": request_id, "model_id": model.model_id}
