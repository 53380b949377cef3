"""The client half of the one-pass custom loss (`TrainingClient.forward_backward_custom`).

The server runs the forward once and keeps its autograd graph; here the user's loss function runs
on leaf tensors holding the returned logprobs, torch gives d loss / d logprobs, and those gradients
go back to the server, which chains them through the kept graph. The gradient reaching the weights
is therefore exactly that of the user's loss, with one forward pass instead of the Tinker SDK's two.

This module also checks what the loss function returns (a scalar tensor that depends on the
logprobs, and a dict of metrics) and raises a UserInputError naming the field otherwise.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from tether.types.data import Datum, ForwardBackwardOutput
from tether.types.errors import UserInputError
from tether.types.wire import TensorDataJson

if TYPE_CHECKING:
    import torch

    from tether.client.routes import KeptGraph

CustomLossFn = Callable[[list[Datum], list["torch.Tensor"]], tuple["torch.Tensor", dict[str, float]]]


def compute_logprob_grads(
    data: Sequence[Datum], logprobs: Sequence[np.ndarray], loss_fn: CustomLossFn
) -> tuple[float, dict[str, float], list[np.ndarray]]:
    """Run `loss_fn` on leaf tensors of `logprobs`; return (loss, metrics, d loss / d logprobs per datum)."""
    import torch

    leaves = [torch.tensor(np.asarray(lp, dtype=np.float32), requires_grad=True) for lp in logprobs]
    returned = loss_fn(list(data), leaves)
    if not (isinstance(returned, tuple) and len(returned) == 2):
        raise UserInputError("must return a tuple (loss, metrics)", field="loss_fn")
    loss, metrics = returned
    if not isinstance(loss, torch.Tensor):
        raise UserInputError(f"loss must be a torch.Tensor, got {type(loss).__name__}", field="loss_fn")
    if loss.dim() != 0:
        raise UserInputError(f"loss must be a scalar tensor, got shape {list(loss.shape)}", field="loss_fn")
    if not loss.requires_grad or loss.grad_fn is None:
        raise UserInputError(
            "loss does not depend on the logprobs (no grad); build it from the logprobs tensors",
            field="loss_fn",
        )
    if not math.isfinite(float(loss.detach())):
        raise UserInputError(f"loss is not finite ({float(loss.detach())})", field="loss_fn")
    if not isinstance(metrics, dict):
        raise UserInputError(f"metrics must be a dict, got {type(metrics).__name__}", field="loss_fn")
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads_np = []
    for index, (grad, leaf) in enumerate(zip(grads, leaves, strict=True)):
        g = torch.zeros_like(leaf) if grad is None else grad.detach()
        if not bool(torch.isfinite(g).all()):
            raise UserInputError("d loss / d logprobs is not finite", field="logprobs", datum_index=index)
        grads_np.append(g.numpy().astype(np.float32))
    try:
        metrics_f = {str(k): float(v) for k, v in metrics.items()}
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"metrics values must be numbers: {exc}", field="loss_fn") from exc
    return float(loss.detach()), metrics_f, grads_np


async def run_one_pass_custom_loss(
    data: Sequence[Datum],
    loss_fn: CustomLossFn,
    forward: Callable[[], Awaitable[KeptGraph]],
    backward: Callable[[str, list[TensorDataJson]], Awaitable[dict[str, float]]],
) -> ForwardBackwardOutput:
    """Forward (graph kept) -> local loss and gradients -> backward from those gradients.

    The loss, its gradients and their wire form are computed on a worker thread, off the SDK loop.
    If the loss function fails, zero gradients are still sent so the server frees the graph at once
    and the model's later operations run (zeros leave the accumulated gradients unchanged).
    """
    kept = await forward()
    output = kept.output
    logprobs = [out["logprobs"].to_numpy() for out in output.loss_fn_outputs]
    try:
        loss, user_metrics, grads = await asyncio.to_thread(_loss_and_wire_grads, data, logprobs, loss_fn)
    except BaseException:
        zeros = await asyncio.to_thread(_wire_grads, [np.zeros_like(lp, dtype=np.float32) for lp in logprobs])
        await backward(kept.graph_id, zeros)
        raise
    backward_metrics = await backward(kept.graph_id, grads)
    metrics = {k: v for k, v in backward_metrics.items() if k != "loss:sum"}
    metrics.update(user_metrics)
    metrics["loss:sum"] = loss
    return ForwardBackwardOutput(
        loss_fn_output_type=output.loss_fn_output_type,
        loss_fn_outputs=output.loss_fn_outputs,
        metrics=metrics,
    )


def _loss_and_wire_grads(
    data: Sequence[Datum], logprobs: Sequence[np.ndarray], loss_fn: CustomLossFn
) -> tuple[float, dict[str, float], list[TensorDataJson]]:
    loss, metrics, grads = compute_logprob_grads(data, logprobs, loss_fn)
    return loss, metrics, _wire_grads(grads)


def _wire_grads(grads: Sequence[np.ndarray]) -> list[TensorDataJson]:
    return [TensorDataJson.from_numpy(np.asarray(g, dtype=np.float32)) for g in grads]
