"""The training engine over many ranks: FSDP2-sharded models, data split by tokens, exact sums.

`DistributedTrainingEngine` is a `TrainingEngine` whose every method is called by all ranks of the
default process group in lock-step (same arguments, same order); answers are complete on every rank.

- Full fine-tuning: each training model is a copy of the base model sharded with FSDP2
  (`fully_shard` on every decoder layer, then on the root), so its weights, gradients and AdamW
  moments are split across ranks.
- LoRA: the adapters share one sharded, frozen copy of the base model; the adapters themselves are
  small and replicated on every rank, their gradients summed across ranks before each step.
- A request's datums are split across ranks by tokens (longest first to the least-loaded rank);
  every rank runs the same number of forward/backward passes (a rank with fewer micro-batches runs
  zero-weighted one-token passes) so FSDP's collectives always pair up.
- Losses keep tinker's token-sum semantics: FSDP's reduce-scatter is told not to average
  (`set_gradient_divide_factor(1.0)`), so the gradients are the single-process gradients.
- Outputs are gathered with an all-reduce of zero-filled buffers (each value is written by exactly
  one rank, so the sum is exact); nothing is pickled.

The unsharded base model (`base.model`) stays as loaded: it is the source of new copies and the
sampling engine's model. This module knows nothing about ops, sockets or storage.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from tether.engine.lora import LoraSpec, MultiLoraLinear, add_adapter, lora_layers, remove_adapter
from tether.engine.losses import get_loss, resolve_loss_config
from tether.engine.micro_batching import plan_micro_batches, target_logprobs
from tether.engine.model_loading import LoadedBaseModel
from tether.engine.optimizer import MOMENT_KEYS, ModelOptimizer, check_moments
from tether.engine.training_engine import (
    TrainingEngine,
    _check_logprob_grads,
    _full_copy,
    _plain_name,
    _TrainingModel,
)
from tether.engine.training_state import STATE_FORMAT, SamplerWeights, TrainingState, lora_spec_metadata
from tether.engine.training_types import AdamWParams, EngineDatum, ForwardResult, GraphHandle, LossRequest
from tether.types.errors import ConfigurationError, ConflictError, NotFoundError, UserInputError

__all__ = ["DistributedTrainingEngine", "broadcast_bytes", "all_gather_bytes", "split_by_tokens"]


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
    replicated tensors (LoRA adapters) are all-reduced here. Moments of sharded tensors are sharded.
    """

    def step(self, params: AdamWParams) -> dict[str, float]:
        params.validate()
        tensors = list(self.named_params.values())
        unsummed = {
            id(t): t.grad.clone() for t in tensors if not isinstance(t, DTensor) and t.grad is not None
        }
        self._sum_replicated_grads(tensors)
        with_grad = [t for t in tensors if t.grad is not None]
        squares = torch.zeros((), dtype=torch.float64, device=comm_device())
        for t in with_grad:
            local = _local(cast(torch.Tensor, t.grad)).detach()
            part = local.double().pow(2).sum().to(squares.device)
            squares += part / dist.get_world_size() if not isinstance(t.grad, DTensor) else part
        dist.all_reduce(squares)
        grad_norm = squares.sqrt()
        # refuse (or skip) a step that would make weights or moments non-finite, as one process does
        # (`ModelOptimizer.step`): the global norm is the same on every rank; the update check runs
        # on each rank's shards and the ranks agree on it before anything changes
        if not bool(torch.isfinite(grad_norm)):
            self._optimizer.zero_grad(set_to_none=True)
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
            if params.grad_clip_norm > 0 and with_grad
            else 1.0
        )
        finite = torch.tensor(
            [1 if self._local_update_is_finite(params, coef_value) else 0], device=comm_device()
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
        if params.grad_clip_norm > 0 and with_grad:
            coef = torch.clamp(params.grad_clip_norm / (grad_norm + 1e-6), max=1.0)
            for t in with_grad:
                _local(cast(torch.Tensor, t.grad)).mul_(
                    coef.to(
                        device=_local(cast(torch.Tensor, t.grad)).device,
                        dtype=_local(cast(torch.Tensor, t.grad)).dtype,
                    )
                )
        for group in self._optimizer.param_groups:
            group["lr"] = params.learning_rate
            group["betas"] = (params.beta1, params.beta2)
            group["eps"] = params.eps
            group["weight_decay"] = params.weight_decay
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self.num_steps += 1
        return {"grad_norm:mean": float(grad_norm), "learning_rate:mean": float(params.learning_rate)}

    def _local_update_is_finite(self, params: AdamWParams, coef: float) -> bool:
        """`ModelOptimizer._update_is_finite` on this rank's shards (plain tensors: no collective)."""
        view = object.__new__(ModelOptimizer)
        view.named_params, states = {}, {}
        for name, tensor in self.named_params.items():
            local = _local(tensor).detach()
            if tensor.grad is not None:
                local.grad = _local(tensor.grad).detach()
            view.named_params[name] = local
            state = self._optimizer.state.get(tensor)
            if state:
                states[local] = {
                    key: _local(value) if torch.is_tensor(value) else value for key, value in state.items()
                }
        view._optimizer = SimpleNamespace(state=states)  # type: ignore[assignment]  # a view with only .state
        return ModelOptimizer._update_is_finite(view, params, coef)

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

    def import_moments(self, moments: Mapping[str, torch.Tensor], num_steps: int) -> None:
        """Replace all moments with full tensors (as `export_moments` returns them), sharded like the weights."""
        check_moments(moments, {name: tuple(t.shape) for name, t in self.named_params.items()})
        self._optimizer.state.clear()
        for name, tensor in self.named_params.items():
            if f"step.{name}" not in moments:
                continue
            self._optimizer.state[tensor] = {
                key: moments[f"{key}.{name}"].detach().clone()
                if key == "step"
                else _like(moments[f"{key}.{name}"], tensor)
                for key in MOMENT_KEYS
            }
        self.num_steps = num_steps


# ---- the engine ----------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules whose class Hugging Face names in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserInputError(
            f"cannot find the decoder layers of {type(model).__name__} to shard", field="base_model"
        )
    return layers


@dataclass
class _Share:
    model_id: str
    optimizer_steps: int
    indices: list[int]
    shapes: list[tuple[int, ...]]
    dummies: list[torch.Tensor]
    deadline: float | None = None


class DistributedTrainingEngine(TrainingEngine):
    """A `TrainingEngine` sharded over the ranks of the default process group (see the module docstring).

    `mixed_precision` "bfloat16" keeps fp32 weights, gradient reduction and moments while computing
    in bf16 (FSDP's `MixedPrecisionPolicy`); None computes in the weights' dtype.
    Raises `RuntimeError` if the default process group is not initialised.
    """

    def __init__(
        self,
        base: LoadedBaseModel,
        *,
        max_tokens_per_micro_batch: int = 8192,
        mixed_precision: str | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DistributedTrainingEngine needs torch.distributed initialised (torchrun)")
        super().__init__(base, max_tokens_per_micro_batch=max_tokens_per_micro_batch)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        self.mesh: DeviceMesh = init_device_mesh(device_type, (self.world_size,))
        self._device = comm_device()
        self._policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if mixed_precision == "bfloat16"
            else MixedPrecisionPolicy()
        )
        if mixed_precision not in (None, "none", "bfloat16"):
            raise ConfigurationError(f"unknown mixed precision {mixed_precision!r}", field="mixed_precision")
        self._skeleton = any(p.is_meta for p in base.model.parameters())
        """The base model is a meta-device skeleton: copies are sharded, then each rank reads its shards."""
        self._lora_model: nn.Module | None = None
        self._shares: dict[str, _Share] = {}
        """Kept graphs by id: this rank's datum indices, every datum's shape, its dummy passes."""

    # ---- sharding ------------------------------------------------------------------------------

    def _shard(self, module: nn.Module, *, fill: bool = True) -> nn.Module:
        """`module` (a copy of the base model) sharded; from a meta-device skeleton, its shards are
        allocated on this rank's device and, with `fill`, read from the base model's safetensors."""
        buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
        layers = decoder_layers(module)
        for layer in layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=self._policy)
        fully_shard(module, mesh=self.mesh, mp_policy=self._policy)
        for fsdp_module in cast(list[FSDPModule], [*layers, module]):
            # token sums: reduce-scatter sums and never averages (plain SUM, which gloo supports too)
            fsdp_module.set_gradient_divide_factor(1.0)
            fsdp_module.set_force_sum_reduction_for_comms(True)
        if self._skeleton:
            module.to_empty(device=self._device)  # this rank's shards only
            with torch.no_grad():
                for name, buffer in module.named_buffers():  # computed, not stored: as the skeleton has them
                    buffer.copy_(buffers[name])
            if fill:
                self._read_base_shards(module)
        return module

    def _read_base_shards(self, module: nn.Module) -> None:
        """Each rank reads from the base model's safetensors only the slices its shards hold
        (`torch.distributed.checkpoint` with its Hugging Face reader: a collective)."""
        from torch.distributed.checkpoint import HuggingFaceStorageReader, load

        reader = HuggingFaceStorageReader(str(self.base.path))
        stored = reader.read_metadata().state_dict_metadata
        wrapped = [f"{name}.base." for name, _ in lora_layers(module)]
        names: dict[int, list[str]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for name, param in module.named_parameters(remove_duplicate=False):  # tied weights: one read
            names.setdefault(id(param), []).append(_plain_name(name, wrapped))
            tensors[id(param)] = param
        state = {}
        for key, aliases in names.items():
            found = next((name for name in aliases if name in stored), None)
            if found is None:
                raise UserInputError(
                    f"{self.base.path} holds no weights for {aliases[0]!r}", field="base_model"
                )
            state[found] = tensors[key].detach()
        load(state, storage_reader=reader)

    def _lora_base(self) -> nn.Module:
        """The frozen sharded copy of the base model (with its LoRA wrappers) all adapters share."""
        if self._lora_model is None:
            wrappers = [m for m in self.base.model.modules() if isinstance(m, MultiLoraLinear)]
            memo: dict[int, Any] = {id(w.adapters): {} for w in wrappers}  # no other adapters' tensors
            clone = copy.deepcopy(self.base.model, memo)
            clone.requires_grad_(False)
            clone.eval()
            self._lora_model = self._shard(clone)
        return self._lora_model

    def _build_model(self, model_id: str, lora: LoraSpec | None, *, fill: bool = True) -> _TrainingModel:
        """A new training model; without `fill`, a full copy's shards are left unread (a load fills them)."""
        if lora is not None:
            module = self._lora_base()
            params = add_adapter(module, model_id, lora, dtype=torch.float32)
            for tensor in params.values():  # identical already (seeded); made certain
                dist.broadcast(tensor.data, 0)
            return _TrainingModel(model_id, lora, module, model_id, params, DistributedOptimizer(params))
        module = self._shard(_full_copy(self.base.model), fill=fill)
        params = {name: p for name, p in module.named_parameters()}
        return _TrainingModel(model_id, None, module, None, params, DistributedOptimizer(params))

    def _drop(self, model_id: str) -> None:
        trained = self._models.pop(model_id)
        if trained.lora is not None and self._lora_model is not None:
            remove_adapter(self._lora_model, model_id)
        for graph_id in [g for g, kept in self._graphs.items() if kept.model_id == model_id]:
            del self._graphs[graph_id]
        for graph_id in [g for g, share in self._shares.items() if share.model_id == model_id]:
            del self._shares[graph_id]

    # ---- forward / backward --------------------------------------------------------------------

    def _share(self, data: list[EngineDatum]) -> list[int]:
        return self._split(data)[self.rank]

    def _split(self, data: list[EngineDatum]) -> list[list[int]]:
        return split_by_tokens([d.input_tokens.shape[0] for d in data], self.world_size)

    def _plan(self, data: list[EngineDatum]) -> list[list[int]]:
        return (
            plan_micro_batches([d.input_tokens.shape[0] for d in data], self.max_tokens_per_micro_batch)
            if data
            else []
        )

    def _run_dummies(
        self,
        trained: _TrainingModel,
        data: list[EngineDatum],
        mine: list[EngineDatum],
        *,
        backward: bool,
        keep: bool = False,
    ) -> list[torch.Tensor]:
        """Zero-weighted one-token passes until every rank has run as many micro-batches as the busiest.

        With `keep`, the passes record graphs and their logprobs are returned for a later backward.
        """
        count = len(self._plan(mine))
        most = max(
            len(self._plan([data[i] for i in share])) for share in self._split(data)
        )  # no collective needed
        dummy = EngineDatum(
            input_tokens=torch.zeros(1, dtype=torch.int64),
            loss_fn_inputs={"target_tokens": torch.zeros(1, dtype=torch.int64)},
        )
        from tether.engine.lora import adapter_routing

        kept = []
        for _ in range(most - count):
            with torch.set_grad_enabled(backward or keep), adapter_routing(trained.routing):
                logprobs = target_logprobs(trained.module, [dummy], self._device)
                if backward:
                    (logprobs.flat.sum() * 0.0).backward()
                elif keep:
                    kept.append(logprobs.flat)
        return kept

    def _run_one(self, request: LossRequest) -> ForwardResult:
        """Every forward(_backward) goes through the sharded path (each rank its share of the datums)."""
        with self._lock:
            return self._run_loss(
                request.model_id,
                request.data,
                request.loss_fn,
                request.loss_fn_config,
                backward=request.backward,
            )

    def forward_backward_fused(self, requests: Sequence[LossRequest]) -> list[ForwardResult | Exception]:
        """No fused passes across ranks: each request runs on its own (the trainer never fuses here)."""
        results: list[ForwardResult | Exception] = []
        for request in requests:
            try:
                results.append(self._run_one(request))
            except Exception as exc:  # noqa: BLE001 - one result or error per request, as the base class
                results.append(exc)
        return results

    def _run_loss(
        self,
        model_id: str,
        data: Sequence[EngineDatum],
        loss_fn: str,
        loss_fn_config: dict | None,
        *,
        backward: bool,
    ) -> ForwardResult:
        trained = self._get(model_id)
        resolve_loss_config(loss_fn, loss_fn_config)  # user errors first, the same on every rank
        checked = self._validate(data, get_loss(loss_fn).required_inputs)
        indices = self._share(checked)
        mine = [checked[i] for i in indices]
        local = (
            super()._run_one(LossRequest(model_id, mine, loss_fn, loss_fn_config, backward=backward))
            if mine
            else None
        )
        self._run_dummies(trained, checked, mine, backward=backward)
        outputs = self._gather_outputs(checked, indices, local.outputs if local else [])
        loss = torch.tensor(
            [local.metrics["loss:sum"] if local else 0.0], dtype=torch.float64, device=self._device
        )
        dist.all_reduce(loss)
        return ForwardResult(outputs=outputs, metrics={"loss:sum": float(loss.item())})

    def _gather_outputs(
        self, data: list[EngineDatum], indices: list[int], local: list[dict[str, torch.Tensor]]
    ) -> list[dict[str, torch.Tensor]]:
        """Every datum's outputs on every rank; each rank fills its own datums' places in a shared buffer."""
        described = (
            ";".join(f"{k}:{str(v.dtype).removeprefix('torch.')}" for k, v in local[0].items())
            if local
            else None
        )
        keys = [
            item.split(":")
            for item in broadcast_bytes(described.encode() if described else None).decode().split(";")
        ]
        shapes = [tuple(d.loss_fn_inputs["target_tokens"].shape) for d in data]
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        outputs: list[dict[str, torch.Tensor]] = [{} for _ in data]
        for key, dtype_name in keys:
            dtype = getattr(torch, dtype_name)
            buffer = torch.zeros(offsets[-1], dtype=dtype, device=self._device)
            for index, values in zip(indices, local, strict=True):
                buffer[offsets[index] : offsets[index + 1]] = values[key].reshape(-1).to(self._device)
            dist.all_reduce(buffer)
            buffer = buffer.cpu()
            for index, shape in enumerate(shapes):
                outputs[index][key] = buffer[offsets[index] : offsets[index + 1]].reshape(shape)
        return outputs

    def forward_keep_graph(
        self,
        model_id: str,
        data: Sequence[EngineDatum],
        *,
        graph_id: str | None = None,
        ttl_s: float | None = None,
    ) -> tuple[GraphHandle, ForwardResult]:
        """Like `TrainingEngine.forward_keep_graph`, each rank keeping the graph of its share of the datums.

        `ttl_s` sets the graph's deadline, but no rank frees it on its own clock (that could part
        the ranks): the caller asks `expired_graphs` on one rank and releases them on all.
        """
        with self._lock:
            trained = self._get(model_id)
            if graph_id is not None and (graph_id in self._graphs or graph_id in self._shares):
                raise ConflictError(f"graph {graph_id!r} is already kept")
            checked = self._validate(data, ("target_tokens",))
            graph_id = graph_id or f"graph-{next(self._graph_ids)}"  # the same id on every rank
            indices = self._share(checked)
            mine = [checked[i] for i in indices]
            local = super().forward_keep_graph(model_id, mine, graph_id=graph_id)[1] if mine else None
            dummies = self._run_dummies(trained, checked, mine, backward=False, keep=True)
            deadline = time.monotonic() + ttl_s if ttl_s is not None else None
            self._shares[graph_id] = _Share(
                model_id,
                trained.optimizer.num_steps,
                indices,
                [tuple(d.loss_fn_inputs["target_tokens"].shape) for d in checked],
                dummies,
                deadline,
            )
            outputs = self._gather_outputs(checked, indices, local.outputs if local else [])
            loss = torch.tensor(
                [local.metrics["loss:sum"] if local else 0.0], dtype=torch.float64, device=self._device
            )
            dist.all_reduce(loss)
            return GraphHandle(graph_id=graph_id, model_id=model_id), ForwardResult(
                outputs, {"loss:sum": float(loss.item())}
            )

    def backward_from_logprob_grads(
        self, handle: GraphHandle, grads: Sequence[torch.Tensor]
    ) -> dict[str, float]:
        """Like `TrainingEngine.backward_from_logprob_grads`; every check happens before any collective."""
        with self._lock:
            share = self._shares.get(handle.graph_id)
            if share is None or share.model_id != handle.model_id:
                raise NotFoundError(f"graph {handle.graph_id!r} does not exist (expired, released or used)")
            if self._get(share.model_id).optimizer.num_steps != share.optimizer_steps:
                raise UserInputError("the model took an optimizer step since this forward", field="graph_id")
            checked = _check_logprob_grads(grads, share.shapes)
            del self._shares[handle.graph_id]
            local = (
                super().backward_from_logprob_grads(handle, [checked[i] for i in share.indices])
                if share.indices
                else {}
            )
            for dummy in share.dummies:
                torch.autograd.backward(dummy, torch.zeros_like(dummy))
            loss = torch.tensor([local.get("loss:sum", 0.0)], dtype=torch.float64, device=self._device)
            dist.all_reduce(loss)
            return {"loss:sum": float(loss.item())}

    def release_graph(self, handle: GraphHandle) -> None:
        with self._lock:
            self._shares.pop(handle.graph_id, None)
            super().release_graph(handle)

    def expired_graphs(self, now: float | None = None) -> list[GraphHandle]:
        """Kept graphs whose `ttl_s` has passed by this rank's clock (nothing is freed here)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return [
                GraphHandle(graph_id=g, model_id=share.model_id)
                for g, share in self._shares.items()
                if share.deadline is not None and share.deadline <= now
            ]

    def reap_expired_graphs(self, now: float | None = None) -> int:
        """Never on its own clock (see `expired_graphs`): 0."""
        return 0

    def accumulated_gradients(self, model_id: str) -> dict[str, torch.Tensor]:
        """Full gradients on every rank (a collective): sharded ones gathered, replicated ones summed."""
        with self._lock:
            trained = self._get(model_id)
            out = {}
            for name, t in trained.params.items():
                if t.grad is None:
                    continue
                grad = t.grad.detach()
                if isinstance(grad, DTensor):
                    out[name] = grad.full_tensor().clone()
                else:
                    summed = grad.clone().to(self._device)
                    dist.all_reduce(summed)
                    out[name] = summed.cpu()
            return out

    # ---- state ---------------------------------------------------------------------------------

    def export_state(self, model_id: str, *, include_optimizer: bool) -> TrainingState:
        """Full (gathered) weights and moments on every rank: a collective."""
        with self._lock:
            state = super().export_state(model_id, include_optimizer=include_optimizer)
            state.weights = {name: _full(t).detach().clone() for name, t in state.weights.items()}
            return state

    def sharded_state(self, model_id: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's view of the weights and moments, for a DCP save (no collective), and the metadata.

        Keys `weights/<name>` and `optimizer/<moment>.<name>`; sharded tensors stay DTensors (each rank
        writes its shards), replicated ones are plain (written once). Metadata as `export_state`'s.
        """
        with self._lock:
            trained = self._get(model_id)
            flat = {f"weights/{name}": t.detach() for name, t in trained.params.items()}
            moments = ModelOptimizer.export_moments(trained.optimizer)  # the shards: no gather
            flat.update({f"optimizer/{key}": value for key, value in moments.items()})
            metadata = {
                "format": STATE_FORMAT,
                "base_model": self.base.name,
                "is_lora": trained.lora is not None,
                "lora": lora_spec_metadata(trained.lora),
                "optimizer_steps": trained.optimizer.num_steps,
            }
            return flat, metadata

    def _load_weight(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        tensor.copy_(_like(value, tensor))  # a full tensor, sharded like the parameter

    def import_sharded_state(
        self,
        model_id: str,
        metadata: Mapping[str, Any],
        shapes: Mapping[str, tuple[int, ...]],
        load: Callable[[dict[str, torch.Tensor]], None],
        *,
        include_optimizer: bool,
    ) -> None:
        """Create (or replace) `model_id` from a stored state of which each rank reads only its shards.

        `shapes` names every stored tensor as `sharded_state` does (`weights/<name>`,
        `optimizer/<moment>.<name>`) with its full shape; `metadata` is `export_state`'s.
        `load(flat)` must fill the given tensors in place under those keys, sharded ones (DTensors)
        with this rank's shards only: `torch.distributed.checkpoint.load` does, reading only the
        slices each rank needs, however many ranks wrote the state. Names and shapes are checked
        like `import_state` before anything changes (UserInputError). A collective.
        """
        with self._lock:
            state = TrainingState(
                weights={
                    k.removeprefix("weights/"): torch.empty(s, device="meta")
                    for k, s in shapes.items()
                    if k.startswith("weights/")
                },
                optimizer={
                    k.removeprefix("optimizer/"): torch.empty(s, device="meta")
                    for k, s in shapes.items()
                    if k.startswith("optimizer/")
                }
                if include_optimizer
                else None,
                metadata=dict(metadata),
            )
            self._check_state(state, include_optimizer=include_optimizer)
            if model_id in self._models:
                self._drop(model_id)
            trained = self._build_model(model_id, state.lora_spec, fill=False)
            flat = {f"weights/{name}": t.detach() for name, t in trained.params.items()}
            moments: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
            for key in state.optimizer or {}:
                if not key.startswith("step."):
                    continue
                name = key.removeprefix("step.")
                tensor = trained.params[name].detach()
                moments[trained.params[name]] = {
                    "exp_avg": torch.zeros_like(tensor),
                    "exp_avg_sq": torch.zeros_like(tensor),
                    "step": torch.zeros(shapes[f"optimizer/{key}"], dtype=torch.float32),
                }
                flat.update({f"optimizer/{k}.{name}": v for k, v in moments[trained.params[name]].items()})
            load(flat)
            trained.optimizer._optimizer.state.clear()
            trained.optimizer._optimizer.state.update(moments)
            trained.optimizer.num_steps = int(metadata.get("optimizer_steps", 0)) if include_optimizer else 0
            self._models[model_id] = trained

    def sampler_weights(self, model_id: str) -> SamplerWeights:
        """Full weights on every rank (a collective for full fine-tuning)."""
        with self._lock:
            trained = self._get(model_id)
            if trained.lora is not None:
                return super().sampler_weights(model_id)
            gathered: dict[int, torch.Tensor] = {}
            tensors = {}
            for name, t in trained.module.state_dict().items():
                if id(t) not in gathered:  # tied weights stay one tensor
                    gathered[id(t)] = _full(t).detach().clone().cpu()
                tensors[name] = gathered[id(t)]
            return SamplerWeights(base_model=self.base.name, lora_spec=None, tensors=tensors)
