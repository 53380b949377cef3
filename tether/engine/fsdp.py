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

Start-up and loads are sharded: given a meta-device skeleton of the base model
(`load_base_model(..., weights=False)`), every copy is sharded first and each rank then allocates
and reads only its shards, of the base weights from their safetensors and of a saved state from
its DCP or safetensors files (`torch.distributed.checkpoint`, which reads just the slices a rank's
shards cover, so states move between any numbers of ranks). No rank ever holds a whole copy.
Given a materialised base model instead, copies are made from it and then sharded.
This module knows nothing about ops, sockets or storage.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from tether.engine.fsdp_collectives import (
    DistributedOptimizer,
    _full,
    _like,
    all_gather_bytes,
    broadcast_bytes,
    comm_device,
    split_by_tokens,
)
from tether.engine.lora import LoraSpec, MultiLoraLinear, add_adapter, lora_layers, remove_adapter
from tether.engine.losses import get_loss, resolve_loss_config
from tether.engine.micro_batching import plan_micro_batches, target_logprobs
from tether.engine.model_loading import LoadedBaseModel
from tether.engine.optimizer import MASTER_KEY, ModelOptimizer
from tether.engine.training_engine import (
    TrainingEngine,
    _check_logprob_grads,
    _full_copy,
    _plain_name,
    _TrainingModel,
)
from tether.engine.training_state import STATE_FORMAT, SamplerWeights, TrainingState, lora_spec_metadata
from tether.engine.training_types import EngineDatum, ForwardResult, GraphHandle, LossRequest
from tether.types.errors import ConfigurationError, ConflictError, NotFoundError, UserInputError

__all__ = ["DistributedTrainingEngine", "broadcast_bytes", "all_gather_bytes", "split_by_tokens"]


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

    `mixed_precision` "bfloat16" computes in bf16 with gradient reduction in fp32 (FSDP's
    `MixedPrecisionPolicy`), keeping the weights in the dtype they were loaded in (fp32 weights and
    moments from an fp32 base); None computes in the weights' dtype. Either way, sharded bf16/fp16
    weights are stepped through sharded fp32 masters with fp32 moments (`DistributedOptimizer`).
    Raises `RuntimeError` if the default process group is not initialised.
    """

    def __init__(
        self,
        base: LoadedBaseModel,
        *,
        max_tokens_per_micro_batch: int = 8192,
        mixed_precision: str | None = None,
        on_nonfinite: Literal["refuse", "skip"] = "refuse",
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DistributedTrainingEngine needs torch.distributed initialised (torchrun)")
        super().__init__(
            base, max_tokens_per_micro_batch=max_tokens_per_micro_batch, on_nonfinite=on_nonfinite
        )
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
            if found is None:  # the same on every rank: the files are the same
                self._broadcast_base_from_rank0(module)
                return
            state[found] = tensors[key].detach()
        load(state, storage_reader=reader)

    def _broadcast_base_from_rank0(self, module: nn.Module) -> None:
        """For checkpoints whose stored names are not the model's (those transformers converts while
        loading): rank 0 loads the model on its CPU with `from_pretrained`, and every rank receives
        its shards, each tensor broadcast in turn (`set_model_state_dict(..., broadcast_from_rank0)`)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from transformers import AutoModelForCausalLM

        wrapped = [f"{name}.base." for name, _ in lora_layers(module)]
        full: dict[str, Any] = {}
        if self.rank == 0:
            dtype = next(self.base.model.parameters()).dtype
            loaded = AutoModelForCausalLM.from_pretrained(self.base.path, dtype=dtype).state_dict()
            full = {name: loaded[_plain_name(name, wrapped)] for name in module.state_dict()}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(module, full, options=options)

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
            optimizer = DistributedOptimizer(params, on_nonfinite=self.on_nonfinite)
            return _TrainingModel(model_id, lora, module, model_id, params, optimizer)
        module = self._shard(_full_copy(self.base.model), fill=fill)
        params = {name: p for name, p in module.named_parameters()}
        optimizer = DistributedOptimizer(params, on_nonfinite=self.on_nonfinite)
        return _TrainingModel(model_id, None, module, None, params, optimizer)

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
        # the loss and (cross_entropy) response tokens of every rank's share, summed in one collective
        keys = ("loss:sum", "response_tokens:sum")
        local_sums = [local.metrics.get(key, 0.0) if local else 0.0 for key in keys]
        sums = torch.tensor(local_sums, dtype=torch.float64, device=self._device)
        dist.all_reduce(sums)
        loss_sum, response_tokens = sums.tolist()
        metrics = {"loss:sum": loss_sum}
        if loss_fn == "cross_entropy":
            metrics["response_tokens:sum"] = response_tokens
        return ForwardResult(outputs=outputs, metrics=metrics)

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
            optimizer = cast(DistributedOptimizer, trained.optimizer)
            moments: dict[str, dict[str, torch.Tensor]] = {}
            for key in state.optimizer or {}:
                if not key.startswith("step."):
                    continue
                name = key.removeprefix("step.")
                tensor = trained.params[name].detach()
                dtype = optimizer.state_dtype(name)  # fp32 moments (and master) for a bf16/fp16 weight
                moments[name] = {
                    "exp_avg": torch.zeros_like(tensor, dtype=dtype),
                    "exp_avg_sq": torch.zeros_like(tensor, dtype=dtype),
                    "step": torch.zeros(shapes[f"optimizer/{key}"], dtype=torch.float32),
                }
                if f"{MASTER_KEY}.{name}" in (state.optimizer or {}) and dtype != tensor.dtype:
                    moments[name][MASTER_KEY] = torch.zeros_like(tensor, dtype=dtype)
                flat.update({f"optimizer/{k}.{name}": v for k, v in moments[name].items()})
            load(flat)
            steps = int(metadata.get("optimizer_steps", 0)) if include_optimizer else 0
            optimizer.adopt_moments(moments, steps)
            self._models[model_id] = trained

    def sampler_weights(self, model_id: str, *, keep: bool = True) -> SamplerWeights:
        """Full weights, on the CPU (a collective for full fine-tuning: every rank must call it).

        Each sharded tensor is gathered in turn; a rank called with `keep=False` (one that writes
        nothing) drops each as soon as it is gathered and gets no tensors back, so only the
        ranks that keep them ever hold the whole model.
        """
        with self._lock:
            trained = self._get(model_id)
            if trained.lora is not None:
                return super().sampler_weights(model_id)
            gathered: dict[int, torch.Tensor] = {}
            tensors = {}
            for name, t in trained.module.state_dict().items():
                if id(t) not in gathered:  # tied weights stay one tensor
                    full = _full(t).detach()
                    gathered[id(t)] = full.to("cpu", copy=True) if keep else full.new_empty(0)
                tensors[name] = gathered[id(t)]
            return SamplerWeights(base_model=self.base.name, lora_spec=None, tensors=tensors if keep else {})
