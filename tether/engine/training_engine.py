"""The training engine: many training models on one loaded base model, and their math.

A training model is either a LoRA adapter on the shared base model (routed by its model id) or,
for full fine-tuning, a private copy of the base weights. Each has its own gradients and its own
optimizer, so one model's step never changes another's weights. Every operation validates its whole
request first and only then touches state, so a failed call leaves weights, gradients and
optimizer moments exactly as they were.

Forward passes run in micro-batches within a token budget; each micro-batch's backward runs right
away, so memory does not grow with the number of datums beyond the outputs themselves. Each backward
also counts its loss tokens and sequences into the model's optimizer, for `optim_step`'s
gradient-accumulation normalisation (`tether.engine.grad_accumulation`); cross_entropy reports its
loss tokens as `response_tokens:sum` (mean NLL = `loss:sum / response_tokens:sum`).

This module knows nothing about HTTP, wire formats or storage; callers are serialised per engine
by a lock (the worker orders operations; the lock only keeps concurrent callers safe).

A frozen engine (`frozen=True`, a forward-only reference trainer) runs forward passes only: a model
created in it is the base model itself (a LoRA spec is recorded, its adapter is disabled), one
that loads saved weights holds them without gradients, and none has an optimizer.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from tether.engine.grad_accumulation import GradAccMode, count_loss_tokens, count_nonzero_positions
from tether.engine.lora import (
    AdapterRouting,
    LoraSpec,
    MultiLoraLinear,
    adapter_routing,
    add_adapter,
    lora_layers,
    remove_adapter,
)
from tether.engine.losses import LossDefinition, get_loss, resolve_loss_config
from tether.engine.micro_batching import (
    MicroBatchLogprobs,
    grouped_target_logprobs,
    plan_micro_batches,
    target_logprobs,
)
from tether.engine.model_loading import LoadedBaseModel
from tether.engine.optimizer import ModelOptimizer, check_moments
from tether.engine.pass_counts import PassCounts
from tether.engine.training_state import STATE_FORMAT, SamplerWeights, TrainingState, lora_spec_metadata
from tether.engine.training_types import AdamWParams, EngineDatum, ForwardResult, GraphHandle, LossRequest
from tether.engine.validation import validate_data
from tether.types.errors import ConfigurationError, ConflictError, NotFoundError, UserInputError

__all__ = [
    "AdamWParams",
    "FrozenModelError",
    "EngineDatum",
    "ForwardResult",
    "GraphHandle",
    "LossRequest",
    "SamplerWeights",
    "TrainingEngine",
    "TrainingState",
]


class FrozenModelError(UserInputError):
    """A training call (backward, step, save) on a frozen model of a forward-only trainer (400)."""


class _NoOptimizer(ModelOptimizer):
    """A frozen model's optimizer: holds no tensors and no state; `TrainingEngine._optimizer` refuses
    every use before one could reach it."""

    def __init__(self) -> None:  # noqa: D107 - torch's AdamW refuses an empty parameter list
        self.on_nonfinite = "refuse"
        self.named_params = {}
        self._low = set()
        self._masters = {}
        self._slots = {}
        self.num_steps = 0


@dataclass
class _TrainingModel:
    """One training model: the module it runs, its trainable tensors and their optimizer."""

    model_id: str
    lora: LoraSpec | None
    module: nn.Module
    routing: str | None
    """Adapter id to route to (LoRA), or None to run `module` as is (full fine-tuning copy)."""
    params: dict[str, torch.Tensor]
    optimizer: ModelOptimizer
    frozen: bool = False
    """A frozen engine's model: no gradients, and `optimizer` is a `_NoOptimizer` that is never used."""


@dataclass
class _Prepared:
    """One request checked and ready to run: its model, loss, resolved config and normalised datums."""

    trained: _TrainingModel
    loss_fn: str
    definition: LossDefinition
    config: dict
    data: list[EngineDatum]
    backward: bool


@dataclass
class _KeptGraph:
    """Per micro-batch: datum indices and their logprobs, still attached to the autograd graph."""

    model_id: str
    optimizer_steps: int
    deadline: float | None = None
    """`time.monotonic()` after which `reap_expired_graphs` frees it; None keeps it until used or released."""
    micro_batches: list[tuple[list[int], MicroBatchLogprobs]] = field(default_factory=list)
    logprob_shapes: list[tuple[int, ...]] = field(default_factory=list)


class TrainingEngine:
    """Hosts training models on one base model and runs forward, backward and optimizer steps."""

    def __init__(
        self,
        base: LoadedBaseModel,
        *,
        max_tokens_per_micro_batch: int = 8192,
        on_nonfinite: Literal["refuse", "skip"] = "refuse",
        frozen: bool = False,
    ) -> None:
        """`on_nonfinite`: what every model's optimizer does with a step that would make weights or
        moments non-finite ("refuse": a user error, "skip": skipped and reported; `ModelOptimizer`).
        `frozen`: forward passes only (see the module docstring); the other training calls raise
        `FrozenModelError`."""
        if max_tokens_per_micro_batch < 1:
            raise ConfigurationError("must be at least 1", field="max_tokens_per_micro_batch")
        if on_nonfinite not in ("refuse", "skip"):
            raise ConfigurationError(
                f"must be 'refuse' or 'skip', got {on_nonfinite!r}", field="on_nonfinite"
            )
        self.on_nonfinite = on_nonfinite
        self.base = base
        self.frozen = frozen
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self._device = next(base.model.parameters()).device
        self._models: dict[str, _TrainingModel] = {}
        self._graphs: dict[str, _KeptGraph] = {}
        self._graph_ids = itertools.count(1)
        self._lock = threading.RLock()
        self.pass_counts = PassCounts()
        """Forward(_backward) passes run and the ops each carried (fused or alone); see `pass_counts`."""

    # ---- lifecycle ---------------------------------------------------------------------------

    def create_model(self, model_id: str, *, lora: LoraSpec | None) -> None:
        """Add a training model: a LoRA adapter with `lora`'s spec, or (None) a full fine-tuning copy."""
        with self._lock:
            if model_id in self._models:
                raise ConflictError(f"model {model_id!r} already exists")
            self._models[model_id] = self._build_model(model_id, lora)

    def delete_model(self, model_id: str) -> None:
        """Drop the model, its adapter or weight copy, its optimizer and any graphs it kept."""
        with self._lock:
            self._get(model_id)
            self._drop(model_id)

    def has_model(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._models

    def list_models(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def model_info(self, model_id: str) -> dict[str, Any]:
        """JSON-able facts about the model (is_lora, lora_rank (0 = full), spec, steps, sizes)."""
        with self._lock:
            trained = self._get(model_id)
            spec = trained.lora
            return {
                "model_id": model_id,
                "base_model": self.base.name,
                "is_lora": spec is not None,
                "lora_rank": spec.rank if spec is not None else 0,
                "lora": lora_spec_metadata(spec),
                "num_trainable_params": sum(t.numel() for t in trained.params.values()),
                "optimizer_steps": trained.optimizer.num_steps,
                "frozen": trained.frozen,
                "vocab_size": self.base.vocab_size,
                "max_context_length": self.base.max_context_length,
            }

    # ---- forward / backward ------------------------------------------------------------------

    def forward(
        self, model_id: str, data: Sequence[EngineDatum], loss_fn: str, loss_fn_config: dict | None = None
    ) -> ForwardResult:
        """Loss and per-datum outputs without recording gradients."""
        return self._run_one(LossRequest(model_id, data, loss_fn, loss_fn_config, backward=False))

    def forward_backward(
        self, model_id: str, data: Sequence[EngineDatum], loss_fn: str, loss_fn_config: dict | None = None
    ) -> ForwardResult:
        """Like `forward`, and add the loss's gradients to the model's (kept until `optim_step`)."""
        return self._run_one(LossRequest(model_id, data, loss_fn, loss_fn_config, backward=True))

    def forward_backward_fused(self, requests: Sequence[LossRequest]) -> list[ForwardResult | Exception]:
        """Run several LoRA models' forward(_backward)s as one batched pass; one result or error per request.

        Each request is validated on its own first; an invalid one gets its exception (nothing of it
        runs) and the rest still run. The valid LoRA requests share micro-batches (the token budget
        applies to all their datums together) with each row routed to its own adapter, and one
        backward per micro-batch of their summed losses: adapters are disjoint tensors, so each gets
        exactly its own loss's gradient. Forward-only requests share a pass of their own, without a graph. Each result (outputs, `loss:sum`) equals what `forward` /
        `forward_backward` would return for that request alone, up to float reassociation (the
        batch is padded to its longest datum, tests hold it to 1e-6 in fp32). Full fine-tuning models
        have their own weights and run one after another. An error raised while the fused pass runs
        (not a validation error) fails every request of that pass.
        """
        with self._lock:
            results: list[ForwardResult | Exception | None] = [None] * len(requests)
            fused: list[tuple[int, _Prepared]] = []
            for index, request in enumerate(requests):
                try:
                    prepared = self._prepare(request)
                except Exception as exc:  # noqa: BLE001 - one request's bad input fails that request only
                    results[index] = exc
                    continue
                if prepared.trained.lora is None:
                    try:
                        results[index] = self._run_prepared([prepared])[0]
                    except Exception as exc:  # noqa: BLE001 - reported per request
                        results[index] = exc
                else:
                    fused.append((index, prepared))
            for backward in (True, False):  # forward-only rows run without a graph, so they never get .grad
                group = [(index, p) for index, p in fused if p.backward == backward]
                if not group:
                    continue
                try:
                    outcomes: list[ForwardResult | Exception] = list(
                        self._run_prepared([p for _, p in group])
                    )
                except Exception as exc:  # noqa: BLE001 - the pass failed: so did each of its requests
                    outcomes = [exc] * len(group)
                for (index, _), outcome in zip(group, outcomes, strict=True):
                    results[index] = outcome
            return results  # type: ignore[return-value]

    def is_lora(self, model_id: str) -> bool | None:
        """Whether `model_id` is a LoRA adapter (True), a full fine-tuning copy (False) or unknown (None).

        Takes no lock (one dict lookup), so a scheduler may ask while an operation runs.
        """
        trained = self._models.get(model_id)
        return None if trained is None else trained.lora is not None

    def optim_step(
        self, model_id: str, params: AdamWParams, *, normalization: GradAccMode = "none"
    ) -> dict[str, float]:
        """Apply AdamW to the accumulated gradients, then clear them (and their counts).

        `normalization` ("none", "num_loss_tokens", "num_sequences") first divides the gradients by
        what they were accumulated over since the last step (`ModelOptimizer.step`). Metrics: grad
        norm (normalised, before clipping), lr, and the divisor unless "none". A refused step
        (UserInputError, NonFiniteStepError) changes nothing it did not say it discarded.
        """
        with self._lock:
            trained = self._get(model_id)
            if not isinstance(params, AdamWParams):
                raise UserInputError("expected AdamWParams", field="adam_params")
            params.validate()
            return self._optimizer(trained, "optim_step").step(params, normalization=normalization)

    def accumulated_counts(self, model_id: str) -> tuple[int, int]:
        """(loss tokens, sequences) the model's gradients were accumulated over since its last step."""
        with self._lock:
            return self._optimizer(self._get(model_id), "accumulated_counts").accumulated_counts()

    def accumulated_gradients(self, model_id: str) -> dict[str, torch.Tensor]:
        """Detached copies of the gradients accumulated since the last step (for inspection and tests)."""
        with self._lock:
            trained = self._get(model_id)
            return {name: t.grad.detach().clone() for name, t in trained.params.items() if t.grad is not None}

    # ---- one-pass custom loss ----------------------------------------------------------------

    def forward_keep_graph(
        self,
        model_id: str,
        data: Sequence[EngineDatum],
        *,
        graph_id: str | None = None,
        ttl_s: float | None = None,
    ) -> tuple[GraphHandle, ForwardResult]:
        """Forward with gradients recorded and the graph kept, for a later `backward_from_logprob_grads`.

        Outputs are per-datum `logprobs` and `loss:sum` of cross entropy with the datums' weights
        (zero where absent), as a forward-only cross_entropy call would report. The graph is named
        `graph_id` (generated if None); with `ttl_s`, `reap_expired_graphs` frees it after that many
        seconds. Raises `ConflictError` if `graph_id` is already kept.
        """
        with self._lock:
            trained = self._get(model_id)
            if graph_id is not None and graph_id in self._graphs:
                raise ConflictError(f"graph {graph_id!r} is already kept")
            checked = self._validate(data, ("target_tokens",))
            steps = self._optimizer(trained, "forward_keep_graph").num_steps
            kept = _KeptGraph(model_id=model_id, optimizer_steps=steps)
            outputs: list[dict[str, torch.Tensor]] = [{} for _ in checked]
            loss_sum = torch.zeros((), device=self._device)
            for indices, logprobs in self._micro_batch_logprobs(trained, checked, grad=True):
                kept.micro_batches.append((indices, logprobs))
                for index, lp in zip(indices, logprobs.per_datum(logprobs.flat.detach()), strict=True):
                    outputs[index]["logprobs"] = lp
                    weights = checked[index].loss_fn_inputs.get("weights")
                    if weights is not None:
                        loss_sum = loss_sum + (-lp * weights.to(lp.device)).sum()
            kept.logprob_shapes = [tuple(o["logprobs"].shape) for o in outputs]
            host = _to_host(
                [o["logprobs"] for o in outputs] + [loss_sum]
            )  # one transfer (and sync) for the request
            outputs = [{"logprobs": lp} for lp in host[:-1]]
            graph_id = graph_id or f"graph-{next(self._graph_ids)}"
            kept.deadline = (
                time.monotonic() + ttl_s if ttl_s is not None else None
            )  # from when the graph exists
            self._graphs[graph_id] = kept
            return GraphHandle(graph_id=graph_id, model_id=model_id), ForwardResult(
                outputs, {"loss:sum": float(host[-1])}
            )

    def backward_from_logprob_grads(
        self, handle: GraphHandle, grads: Sequence[torch.Tensor]
    ) -> dict[str, float]:
        """Backpropagate d loss / d logprobs through a kept graph, accumulating gradients like forward_backward.

        The graph is consumed (freed) on success; on a user error it stays until released.
        Metrics: `loss:sum` of the equivalent cross entropy (weights = -grads), i.e. sum(grads * logprobs).
        """
        with self._lock:
            kept = self._graphs.get(handle.graph_id)
            if kept is None or kept.model_id != handle.model_id:
                raise NotFoundError(f"graph {handle.graph_id!r} does not exist (expired, released or used)")
            trained = self._get(kept.model_id)
            if self._optimizer(trained, "backward").num_steps != kept.optimizer_steps:
                raise UserInputError("the model took an optimizer step since this forward", field="graph_id")
            checked_grads = _check_logprob_grads(grads, kept.logprob_shapes)
            loss_sum = torch.zeros((), device=self._device)
            del self._graphs[handle.graph_id]
            for indices, logprobs in kept.micro_batches:
                flat_grads = logprobs.stack_per_datum([checked_grads[i] for i in indices]).to(
                    logprobs.flat.device
                )
                loss_sum = loss_sum + (flat_grads * logprobs.flat.detach()).sum()
                torch.autograd.backward(logprobs.flat, flat_grads)
            kept.micro_batches.clear()
            trained.optimizer.accumulate(  # the grads were checked on the host: no device sync
                loss_tokens=sum(int(count_nonzero_positions(g)) for g in checked_grads),
                sequences=len(checked_grads),
            )
            return {"loss:sum": float(loss_sum)}  # the request's one sync

    def release_graph(self, handle: GraphHandle) -> None:
        """Free a kept graph without backpropagating (no-op if it is already gone)."""
        with self._lock:
            self._graphs.pop(handle.graph_id, None)

    def reap_expired_graphs(self, now: float | None = None) -> int:
        """Free every kept graph whose deadline has passed; returns how many were freed.

        The trainer calls this between operations, so no thread or timer is kept per graph.
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [
                g for g, kept in self._graphs.items() if kept.deadline is not None and kept.deadline <= now
            ]
            for graph_id in expired:
                del self._graphs[graph_id]
            return len(expired)

    # ---- state -------------------------------------------------------------------------------

    def export_state(self, model_id: str, *, include_optimizer: bool) -> TrainingState:
        """Detached copies of the weights (and optimizer moments) plus metadata to rebuild the model."""
        with self._lock:
            trained = self._get(model_id)
            optimizer = self._optimizer(trained, "save_state")
            weights = {name: t.detach().clone() for name, t in trained.params.items()}
            moments = optimizer.export_moments() if include_optimizer else None
            metadata = {
                "format": STATE_FORMAT,
                "base_model": self.base.name,
                "is_lora": trained.lora is not None,
                "lora": lora_spec_metadata(trained.lora),
                "optimizer_steps": optimizer.num_steps,
            }
            return TrainingState(weights=weights, optimizer=moments, metadata=metadata)

    def import_state(self, model_id: str, state: TrainingState, *, include_optimizer: bool) -> None:
        """Create (or replace) `model_id` from `state`; with `include_optimizer`, restore its moments too.

        The state is checked in full (names, shapes) before an existing model is replaced.
        """
        with self._lock:
            spec = state.lora_spec
            if include_optimizer and self.frozen:
                raise FrozenModelError(
                    "a forward-only trainer holds no optimizer state: load the weights only",
                    field="include_optimizer",
                )
            self._check_state(state, include_optimizer=include_optimizer)
            if model_id in self._models:
                self._drop(model_id)
            if self.frozen:
                trained = self._build_frozen(model_id, spec, loading=True)
            else:
                trained = self._build_model(model_id, spec)
            with torch.no_grad():
                for name, tensor in trained.params.items():
                    self._load_weight(tensor, state.weights[name])
            if include_optimizer and state.optimizer is not None and not trained.frozen:
                trained.optimizer.import_moments(
                    state.optimizer, int(state.metadata.get("optimizer_steps", 0))
                )
            self._models[model_id] = trained

    def sampler_weights(self, model_id: str) -> SamplerWeights:
        """A frozen, detached copy for sampling: LoRA tensors and spec, or the full state dict."""
        with self._lock:
            trained = self._get(model_id)
            self._optimizer(trained, "save_weights_for_sampler")
            if trained.lora is not None:
                tensors = {name: t.detach().clone() for name, t in trained.params.items()}
            else:
                clones: dict[int, torch.Tensor] = {}
                tensors = {}
                for name, t in trained.module.state_dict().items():
                    if id(t) not in clones:  # tied weights stay one tensor
                        clones[id(t)] = t.detach().clone()
                    tensors[name] = clones[id(t)]
            return SamplerWeights(base_model=self.base.name, lora_spec=trained.lora, tensors=tensors)

    # ---- internals ---------------------------------------------------------------------------

    def _check_state(self, state: TrainingState, *, include_optimizer: bool) -> None:
        """Raise `UserInputError` unless `state`'s names and shapes (weights, and moments when asked)
        fit this base model (only `.shape` of its tensors is read: meta tensors will do)."""
        if include_optimizer and state.optimizer is None:
            raise UserInputError("the state was saved without optimizer moments", field="state.optimizer")
        expected = self._expected_shapes(state.lora_spec)
        if set(state.weights) != set(expected):
            missing = sorted(set(expected) - set(state.weights))[:3]
            extra = sorted(set(state.weights) - set(expected))[:3]
            raise UserInputError(
                f"weights do not fit this base model (missing {missing}, unexpected {extra})",
                field="state.weights",
            )
        for name, shape in expected.items():
            if tuple(state.weights[name].shape) != shape:
                raise UserInputError(
                    f"{name!r} has shape {tuple(state.weights[name].shape)}, expected {shape}",
                    field="state.weights",
                )
        if include_optimizer and state.optimizer is not None:  # None was refused above
            check_moments(state.optimizer, expected)

    def _load_weight(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        """Copy a saved full tensor into a parameter (hook: `tether.engine.fsdp` shards it)."""
        tensor.copy_(value)

    def _get(self, model_id: str) -> _TrainingModel:
        trained = self._models.get(model_id)
        if trained is None:
            raise NotFoundError(f"training model {model_id!r} does not exist")
        return trained

    def _drop(self, model_id: str) -> None:
        trained = self._models.pop(model_id)
        if trained.lora is not None and trained.routing is not None:
            remove_adapter(self.base.model, model_id)
        for graph_id in [g for g, kept in self._graphs.items() if kept.model_id == model_id]:
            del self._graphs[graph_id]

    def _optimizer(self, trained: _TrainingModel, call: str) -> ModelOptimizer:
        """The model's optimizer; `FrozenModelError` naming `call` for a frozen model."""
        if trained.frozen:
            raise FrozenModelError(
                f"{call} is refused: model {trained.model_id!r} is frozen (a forward-only reference "
                "trainer: no gradients, no optimizer state, nothing to save)",
                field="op",
            )
        return trained.optimizer

    def _build_model(self, model_id: str, lora: LoraSpec | None) -> _TrainingModel:
        if self.frozen:
            return self._build_frozen(model_id, lora, loading=False)
        if lora is not None:
            params = add_adapter(self.base.model, model_id, lora, dtype=torch.float32)
            optimizer = ModelOptimizer(params, on_nonfinite=self.on_nonfinite)
            return _TrainingModel(model_id, lora, self.base.model, model_id, params, optimizer)
        module = _full_copy(self.base.model)
        params = {name: p for name, p in module.named_parameters()}
        optimizer = ModelOptimizer(params, on_nonfinite=self.on_nonfinite)
        return _TrainingModel(model_id, None, module, None, params, optimizer)

    def _build_frozen(self, model_id: str, lora: LoraSpec | None, *, loading: bool) -> _TrainingModel:
        """A frozen model: the base itself (adapter disabled, nothing copied), or with `loading` a
        gradient-free adapter or weight copy for saved weights to be loaded into."""
        if not loading:
            return _TrainingModel(model_id, lora, self.base.model, None, {}, _NoOptimizer(), frozen=True)
        if lora is not None:
            params = add_adapter(self.base.model, model_id, lora, dtype=torch.float32)
            for tensor in params.values():
                tensor.requires_grad_(False)
            return _TrainingModel(
                model_id, lora, self.base.model, model_id, params, _NoOptimizer(), frozen=True
            )
        module = _full_copy(self.base.model).requires_grad_(False)
        params = dict(module.named_parameters())
        return _TrainingModel(model_id, None, module, None, params, _NoOptimizer(), frozen=True)

    def _expected_shapes(self, lora: LoraSpec | None) -> dict[str, tuple[int, ...]]:
        if lora is None:
            wrapped = [f"{name}.base." for name, _ in lora_layers(self.base.model)]
            return {_plain_name(n, wrapped): tuple(p.shape) for n, p in self.base.model.named_parameters()}
        wanted = {"attn": lora.train_attn, "mlp": lora.train_mlp, "unembed": lora.train_unembed}
        shapes: dict[str, tuple[int, ...]] = {}
        for name, layer in lora_layers(self.base.model):
            if wanted[layer.kind]:
                shapes[f"{name}.lora_A"] = (lora.rank, layer.in_features)
                shapes[f"{name}.lora_B"] = (layer.out_features, lora.rank)
        return shapes

    def _validate(self, data: Sequence[EngineDatum], required_inputs: Sequence[str]) -> list[EngineDatum]:
        return validate_data(
            data,
            required_inputs=required_inputs,
            vocab_size=self.base.vocab_size,
            max_context_length=self.base.max_context_length,
        )

    def _micro_batch_logprobs(
        self, trained: _TrainingModel, data: list[EngineDatum], *, grad: bool
    ) -> Iterator[tuple[list[int], MicroBatchLogprobs]]:
        """Yield (datum indices, their target logprobs) for each micro-batch in turn."""
        lengths = [d.input_tokens.shape[0] for d in data]
        for indices in plan_micro_batches(lengths, self.max_tokens_per_micro_batch):
            with torch.set_grad_enabled(grad), adapter_routing(trained.routing):
                logprobs = target_logprobs(trained.module, [data[i] for i in indices], self._device)
            yield indices, logprobs

    def _prepare(self, request: LossRequest) -> _Prepared:
        """Everything checked before anything runs: the model, the loss and its config, the data."""
        trained = self._get(request.model_id)
        if request.backward:
            self._optimizer(trained, "forward_backward")
        definition = get_loss(request.loss_fn)
        config = resolve_loss_config(request.loss_fn, request.loss_fn_config)
        checked = self._validate(request.data, definition.required_inputs)
        return _Prepared(trained, request.loss_fn, definition, config, checked, request.backward)

    def _run_one(self, request: LossRequest) -> ForwardResult:
        with self._lock:
            return self._run_prepared([self._prepare(request)])[0]

    def _run_prepared(self, parts: list[_Prepared]) -> list[ForwardResult]:
        """One pass over every part's datums; parts > 1 must all be LoRA adapters of the base model and
        all backward or all forward-only (a forward-only adapter in a graph would get zero gradients)."""
        self.pass_counts.record(len(parts))
        datums = [(k, i) for k, part in enumerate(parts) for i in range(len(part.data))]
        lengths = [parts[k].data[i].input_tokens.shape[0] for k, i in datums]
        outputs: list[list[dict[str, torch.Tensor]]] = [[{} for _ in part.data] for part in parts]
        totals: list[torch.Tensor | None] = [None] * len(parts)
        module = parts[0].trained.module
        for batch in plan_micro_batches(lengths, self.max_tokens_per_micro_batch):
            batch = sorted(batch, key=lambda g: datums[g][0])  # each part's rows together, in plan order
            groups = [(k, [datums[g][1] for g in rows]) for k, rows in _runs(batch, [d[0] for d in datums])]
            rows = [parts[k].data[i] for k, indices in groups for i in indices]
            with torch.set_grad_enabled(any(parts[k].backward for k, _ in groups)):
                with adapter_routing(self._routing(parts, groups, rows)):
                    logprobs = grouped_target_logprobs(
                        module, rows, self._device, [len(ix) for _, ix in groups]
                    )
                backward_totals = []
                for (k, indices), group_logprobs in zip(groups, logprobs, strict=True):
                    with torch.set_grad_enabled(parts[k].backward):
                        total = _loss(parts[k], indices, group_logprobs, outputs[k])
                    if parts[k].backward:
                        backward_totals.append(total)
                    detached, so_far = total.detach(), totals[k]
                    totals[k] = detached if so_far is None else so_far + detached
                if backward_totals:
                    (
                        backward_totals[0]
                        if len(backward_totals) == 1
                        else torch.stack(backward_totals).sum()
                    ).backward()
        # one device-to-host transfer (and sync) for the whole request: outputs, loss sums and loss
        # token counts (from the inputs, usually already on the host) together
        counts = [
            count_loss_tokens([d.loss_fn_inputs for d in part.data], part.definition.required_inputs)
            for part in parts
        ]
        flat = [value for part_outputs in outputs for datum in part_outputs for value in datum.values()]
        host = iter(_to_host(flat + [t if t is not None else torch.zeros(()) for t in totals] + counts))
        results = []
        for part_outputs in outputs:
            results.append([{key: next(host) for key in datum} for datum in part_outputs])
        answers = [ForwardResult(outputs=o, metrics={"loss:sum": float(next(host))}) for o in results]
        for part, answer in zip(parts, answers, strict=True):
            loss_tokens = int(next(host))
            if part.loss_fn == "cross_entropy":
                answer.metrics["response_tokens:sum"] = float(loss_tokens)
            if part.backward:
                part.trained.optimizer.accumulate(loss_tokens=loss_tokens, sequences=len(part.data))
        return answers

    def _routing(
        self, parts: list[_Prepared], groups: list[tuple[int, list[int]]], rows: list[EngineDatum]
    ) -> AdapterRouting | str | None:
        """One adapter for a single part (or the full copy's None); else each part's block of rows.

        Whole rows, padding included, as the single-adapter path does: padded positions never reach
        a real token (right padding, attention mask) and are dropped before the loss.
        """
        if len(parts) == 1:
            return parts[0].trained.routing
        spans: list[tuple[str, int, int]] = []
        row = 0
        for k, indices in groups:
            adapter = parts[k].trained.routing
            assert adapter is not None, "only LoRA models are fused"
            spans.append((adapter, row, row + len(indices)))
            row += len(indices)
        return AdapterRouting.for_row_spans(spans, max(d.input_tokens.shape[0] for d in rows))


def _full_copy(model: nn.Module) -> nn.Module:
    """A trainable deep copy of the base model without LoRA wrappers or any adapter's tensors."""
    wrappers = [m for m in model.modules() if isinstance(m, MultiLoraLinear)]
    memo: dict[int, Any] = {id(w.adapters): {} for w in wrappers}  # never copy other models' adapters
    clone = copy.deepcopy(model, memo)
    for name, wrapper in [(n, m) for n, m in clone.named_modules() if isinstance(m, MultiLoraLinear)]:
        parent_name, _, child = name.rpartition(".")
        parent = clone.get_submodule(parent_name) if parent_name else clone
        setattr(parent, child, wrapper.base)
    clone.requires_grad_(True)
    clone.eval()
    return clone


def _plain_name(name: str, wrapped_prefixes: list[str]) -> str:
    """A wrapped base model's parameter name as the unwrapped model names it (`x.base.weight` -> `x.weight`)."""
    for prefix in wrapped_prefixes:
        if name.startswith(prefix):
            return prefix[: -len("base.")] + name[len(prefix) :]
    return name


def _check_logprob_grads(grads: Sequence[torch.Tensor], shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    if not isinstance(grads, Sequence) or len(grads) != len(shapes):
        raise UserInputError(f"expected one gradient per datum ({len(shapes)})", field="logprob_grads")
    checked = []
    for index, (grad, shape) in enumerate(zip(grads, shapes, strict=True)):
        grad = torch.as_tensor(grad).detach().to(torch.float32)
        if tuple(grad.shape) != shape:
            raise UserInputError(
                f"shape {tuple(grad.shape)} must equal the logprobs' shape {shape}",
                field="logprob_grads",
                datum_index=index,
            )
        if not bool(torch.isfinite(grad).all()):
            raise UserInputError("contains NaN or infinite values", field="logprob_grads", datum_index=index)
        checked.append(grad)
    return checked


def _runs(items: list[int], keys: list[int]) -> Iterator[tuple[int, list[int]]]:
    """Consecutive runs of `items` with the same `keys[item]`, as (key, items)."""
    for key, run in itertools.groupby(items, key=lambda item: keys[item]):
        yield key, list(run)


def _loss(
    part: _Prepared, indices: list[int], logprobs: MicroBatchLogprobs, outputs: list[dict[str, torch.Tensor]]
) -> torch.Tensor:
    """The summed loss of `part`'s datums `indices` (laid out in `logprobs`); fills their `outputs`."""
    spec = part.definition.spec
    input_keys = [k for k in spec.required_inputs if k != "target_tokens"]
    optional = [k for k in spec.optional_inputs if any(k in part.data[i].loss_fn_inputs for i in indices)]
    if logprobs.uniform and not spec.per_sequence and not optional:  # one elementwise loss over the group
        device = logprobs.flat.device
        inputs = {
            k: torch.cat([part.data[i].loss_fn_inputs[k] for i in indices]).to(device) for k in input_keys
        }
        total, extra = part.definition.compute(logprobs.flat, inputs, part.config)
        per_datum = {
            key: logprobs.per_datum(value.detach())
            for key, value in {"logprobs": logprobs.flat, **extra}.items()
        }
        for position, index in enumerate(indices):
            outputs[index] = {key: values[position] for key, values in per_datum.items()}
        return total
    losses = []  # datums of different target widths, or a per-sequence loss: one loss each
    for index, lp in zip(indices, logprobs.per_datum(), strict=True):
        given = part.data[index].loss_fn_inputs
        inputs = {k: given[k].to(lp.device) for k in [*input_keys, *optional] if k in given}
        loss, extra = part.definition.compute(lp, inputs, part.config)
        losses.append(loss)
        outputs[index] = {"logprobs": lp.detach(), **{k: v.detach() for k, v in extra.items()}}
    return torch.stack(losses).sum()


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """CPU copies of `tensors` (same shapes), moved in one transfer per dtype: one host sync, not one per tensor."""
    if all(t.device.type == "cpu" for t in tensors):
        return [t.detach() for t in tensors]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(index)
    for indices in by_dtype.values():
        pieces = [tensors[i].detach().reshape(-1) for i in indices]
        host = torch.cat([p.to(pieces[0].device) for p in pieces]).cpu()
        for index, chunk in zip(indices, host.split([p.numel() for p in pieces]), strict=True):
            out[index] = chunk.reshape(tensors[index].shape)
    return out  # type: ignore[return-value]
