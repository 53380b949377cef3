"""Collectives and the optimizer of the sharded training engine (`tether.engine.fsdp`).

Bytes are broadcast and all-gathered as a length and uint8 tensors (never pickle), on the CUDA
device under NCCL and on the CPU under gloo. `DistributedOptimizer` is the `ModelOptimizer` whose
gradients are summed across ranks and whose gradient norm is the global one. This module knows
nothing about models, ops or storage.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from tether.engine.grad_accumulation import GradAccMode, check_mode
from tether.engine.optimizer import MASTER_KEY, ModelOptimizer
from tether.engine.training_types import AdamWParams

__all__ = [
    "DistributedOptimizer",
    "all_gather_bytes",
    "broadcast_bytes",
    "comm_device",
    "exit_process",
    "leave_process_group",
    "split_by_tokens",
]

log = logging.getLogger(__name__)

# ---- collectives on bytes (no pickle) ---------------------------------------------------------


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where `group`'s (default: the world's) collective buffers live: the CUDA device under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_bytes(data: bytes | None, src: int = 0, *, group: dist.ProcessGroup | None = None) -> bytes:
    """`data` (given on global rank `src`, ignored elsewhere) on every rank: its length, then its bytes as uint8."""
    device = comm_device(group)
    length = torch.tensor(
        [len(data or b"") if dist.get_rank() == src else 0], dtype=torch.int64, device=device
    )
    dist.broadcast(length, src, group=group)
    if dist.get_rank() == src:
        buffer = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
            if data
            else torch.empty(0, dtype=torch.uint8, device=device)
        )
    else:
        buffer = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    if buffer.numel():
        dist.broadcast(buffer, src, group=group)
    return bytes(buffer.cpu().numpy().tobytes())


def all_gather_bytes(data: bytes, *, group: dist.ProcessGroup | None = None) -> list[bytes]:
    """Every rank's `data`, in rank order, on every rank of `group`."""
    device = comm_device(group)
    world = dist.get_world_size(group)
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([len(data)], dtype=torch.int64, device=device), group=group)
    longest = max(int(t.item()) for t in lengths)
    if longest == 0:
        return [b""] * world
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    if data:
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    gathered = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    return [bytes(g[: int(n.item())].cpu().numpy().tobytes()) for g, n in zip(gathered, lengths, strict=True)]


def leave_process_group(*, together: bool, timeout_s: float = 60.0) -> None:
    """Destroy the default process group. `together=True` (a clean end on every rank) first waits, up
    to `timeout_s` seconds, until every rank has got here, so that no rank leaves while a peer is still
    running; a rank ending on an error passes False and leaves at once (its peers may be gone).

    The wait keeps ranks from leaving while a peer still runs collectives. A two-rank run's abort at
    exit is `exit_process`'s to prevent: with this wait alone it still happened in 1 of 114 runs (4 of
    55 without), because its cause is the interpreter's shutdown, not the order of leaving. A wait
    that times out or fails (a peer died) is logged and the group destroyed anyway.
    """
    if together:
        try:
            dist.barrier(async_op=True).wait(timeout=timedelta(seconds=timeout_s))
        except Exception as exc:  # noqa: BLE001 - leaving anyway; the reason is logged
            log.warning(
                "not every rank reached the end (waited up to %.0f s): %s; leaving anyway", timeout_s, exc
            )
    dist.destroy_process_group()


def exit_process(status: int = 0) -> NoReturn:
    """End this rank's process now with `status`, after flushing logging, stdout and stderr, without
    the interpreter's shutdown (`os._exit`). Call it last, once the rank has left its process group.

    Why: FSDP's device meshes stay referenced from torch's C++ side after `destroy_process_group`, so
    the gloo process group and its worker threads outlive `main`. A worker still releasing its last
    collective's tensors when the interpreter shuts down needs the GIL to drop their Python objects;
    Python 3.11 then exits that thread by forced unwinding through a noexcept destructor, and the
    process aborts ("terminate called without an active exception", SIGABRT, exit -6; core:
    `ProcessGroupGloo::AsyncWork::~AsyncWork` -> `TensorImpl::decref_pyobject` ->
    `gil_scoped_acquire` -> `PyThread_exit_thread`). torchrun then reports the run as failed.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stream: nothing left to save
    os._exit(status)


def split_by_tokens(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Datum indices per rank: longest first, each to the rank with the fewest tokens so far (ties: lowest rank).

    Deterministic, so every rank computes the same split; rank 0 always gets at least one datum.
    """
    loads = [0] * world_size
    groups: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        groups[rank].append(index)
        loads[rank] += lengths[index]
    return [sorted(g) for g in groups]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`source` (a full tensor) laid out like `target` (sharded like it if `target` is a DTensor)."""
    source = source.to(device=target.device, dtype=target.dtype)
    if isinstance(target, DTensor):
        return distribute_tensor(source, target.device_mesh, target.placements, src_data_rank=None)
    return source


# ---- the optimizer ------------------------------------------------------------------------------


class DistributedOptimizer(ModelOptimizer):
    """`ModelOptimizer` whose gradients are summed across ranks and whose grad norm is the global one.

    Sharded (DTensor) tensors already hold their shard of the summed gradient (FSDP reduce-scatter);
    replicated tensors (LoRA adapters) are all-reduced here. Moments of sharded tensors are sharded,
    and so are the fp32 masters of sharded bf16/fp16 weights (`ModelOptimizer`'s module docstring):
    each rank keeps and steps the masters of its own shards.
    Each rank counts the loss tokens and sequences of its own share of the datums; the counts a
    step normalises by are their sums over the ranks (`accumulated_counts`, a collective).
    """

    def accumulated_counts(self) -> tuple[int, int]:
        """(loss tokens, sequences) summed over the ranks: a collective."""
        counts = torch.tensor([self.loss_tokens, self.sequences], dtype=torch.int64, device=comm_device())
        dist.all_reduce(counts)
        loss_tokens, sequences = counts.tolist()
        return int(loss_tokens), int(sequences)

    def step(self, params: AdamWParams, *, normalization: GradAccMode = "none") -> dict[str, float]:
        params.validate()
        check_mode(normalization)  # the same on every rank: all raise before any collective
        divisor = self.divisor(normalization)
        tensors = list(self.named_params.values())
        unsummed = {
            id(t): t.grad.clone() for t in tensors if not isinstance(t, DTensor) and t.grad is not None
        }
        self._sum_replicated_grads(tensors)
        by_name = self._step_grads()  # fp32 copies for lower-precision tensors (their masters' gradients)
        squares = torch.zeros((), dtype=torch.float64, device=comm_device())
        for grad in by_name.values():
            local = _local(grad).detach()
            part = local.double().pow(2).sum().to(squares.device)
            squares += part / dist.get_world_size() if not isinstance(grad, DTensor) else part
        dist.all_reduce(squares)
        grad_norm = squares.sqrt() / divisor
        # refuse (or skip) a step that would make weights or moments non-finite, as one process does
        # (`ModelOptimizer.step`): the global norm is the same on every rank; the update check runs
        # on each rank's shards and the ranks agree on it before anything changes
        if not bool(torch.isfinite(grad_norm)):
            self.zero_grad()
            return self._nonfinite(
                params,
                float(grad_norm),
                f"the accumulated gradients are not finite (norm "
                f"{float(grad_norm)}): the loss diverged; they were discarded, and the weights "
                "and optimizer moments are unchanged",
                field="gradients",
            )
        coef_value = (
            min(1.0, params.grad_clip_norm / (float(grad_norm) + 1e-6))
            if params.grad_clip_norm > 0 and by_name
            else 1.0
        )
        finite = torch.tensor(
            [1 if self._update_is_finite(params, coef_value / divisor, by_name) else 0], device=comm_device()
        )
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not int(finite.item()):
            for t in tensors:  # the gradients stay as they were for a retry: this rank's own, not the sum
                if id(t) in unsummed:
                    t.grad = unsummed[id(t)]
                elif not isinstance(t, DTensor):
                    t.grad = None
            return self._nonfinite(
                params,
                float(grad_norm),
                f"this step's update would make weights or moments "
                f"non-finite (learning rate {params.learning_rate}, gradient norm "
                f"{float(grad_norm):.3g}); the weights, moments and gradients are unchanged: "
                "retry with a smaller learning rate",
                field="adam_params.learning_rate",
            )
        self._attach_grads(by_name)
        if (params.grad_clip_norm > 0 or divisor != 1.0) and by_name:
            coef = (
                torch.clamp(params.grad_clip_norm / (grad_norm + 1e-6), max=1.0)
                if params.grad_clip_norm > 0
                else torch.ones((), dtype=grad_norm.dtype, device=grad_norm.device)
            ) / divisor
            for grad in by_name.values():
                local = _local(grad)
                local.mul_(coef.to(device=local.device, dtype=local.dtype))
        return self._apply_update(params, float(grad_norm), normalization, divisor)

    def _check_items(
        self, grads: Mapping[str, torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor], torch.dtype]]:
        """`ModelOptimizer._check_items` on this rank's shards (plain tensors: no collective)."""
        for weight, grad, state, dtype in super()._check_items(grads):
            local_state = {key: _local(value) for key, value in state.items()}
            yield _local(weight), _local(grad), local_state, dtype

    def _sum_replicated_grads(self, tensors: list[torch.Tensor]) -> None:
        replicated = [t for t in tensors if not isinstance(t, DTensor)]
        if not replicated:
            return
        device = comm_device()
        has = torch.tensor([t.grad is not None for t in replicated], dtype=torch.int32, device=device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        for t, flag in zip(replicated, has.tolist(), strict=True):
            if not flag:
                continue
            if t.grad is None:
                t.grad = torch.zeros_like(t)
            grad = t.grad.to(device)
            dist.all_reduce(grad)
            if grad is not t.grad:
                t.grad.copy_(grad)

    def export_moments(self) -> dict[str, torch.Tensor]:
        """Full (gathered) copies of every moment, on every rank: a collective."""
        return {key: _full(value).detach().clone() for key, value in super().export_moments().items()}

    def _moment_for(self, key: str, value: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """Full saved moments (and masters) are laid out like the stepped tensor: sharded like it, in
        its dtype (`import_moments` takes full tensors)."""
        return value.detach().clone() if key == "step" else _like(value, tensor)

    @torch.no_grad()
    def adopt_moments(self, moments: Mapping[str, dict[str, torch.Tensor]], num_steps: int) -> None:
        """Use `moments` as the whole optimizer state, by tensor name: its `exp_avg` and `exp_avg_sq`
        laid out like the tensor AdamW steps (fp32 for a lower-precision tensor), its `step`, and for
        a lower-precision tensor optionally its fp32 `master` (without one, the master starts from
        the tensor as loaded). Call it after the weights are loaded."""
        self._drop_masters()
        self._optimizer.state.clear()
        for name, entry in moments.items():
            state = dict(entry)
            master = state.pop(MASTER_KEY, None)
            if name in self._low:
                self._set_master(name, master)
            self._optimizer.state[self._stepped(name)] = state
        self.num_steps = num_steps

    def state_dtype(self, name: str) -> torch.dtype:
        """The dtype of `name`'s stepped weight and moments: fp32 for a lower-precision tensor."""
        return torch.float32 if name in self._low else self.named_params[name].dtype
