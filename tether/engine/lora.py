"""Many LoRA adapters on one shared base model, each routed to its own rows or tokens of a batch.

`attach_lora_layers` wraps the base model's target `nn.Linear` modules once, in place, with
`MultiLoraLinear`. Adapters are then added and removed by id; their weights are plain tensors held
by the wrappers and are **not** registered as parameters of the base model, so the base model's
`parameters()` and `state_dict()` stay exactly the base weights and one adapter's optimizer can
never touch another's tensors.

Which adapter applies to which part of a batch is set per call with `adapter_routing(...)`: one
adapter for the whole batch (training), or a group of flattened token positions per adapter
(sampling many adapters in one batch). The routing lives in a context variable, so threads that run
the same base model at once (a trainer and a sampler) never see each other's routing.

This module knows nothing about losses, optimizers or checkpoints.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tether.types.errors import UserInputError
from tether.types.wire import LoraConfig

MAX_SEED = 2**64 - 1
ATTENTION_MARKERS = ("attn", "attention")
MLP_MARKERS = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class LoraSpec:
    """How one LoRA adapter is shaped and initialised."""

    rank: int
    """Rank r of the update B·A. Must be at least 1 (rank 0 means full fine-tuning, not LoRA)."""
    alpha: float = 32.0
    """The update is scaled by alpha / rank."""
    seed: int | None = None
    """Seed for A's initialisation; the same seed gives the same adapter."""
    train_attn: bool = True
    """Adapt the linear layers of attention blocks."""
    train_mlp: bool = True
    """Adapt the linear layers of MLP blocks."""
    train_unembed: bool = True
    """Adapt the output projection (lm_head)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserInputError(f"LoRA rank must be >= 1, got {self.rank}", field="rank")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise UserInputError(f"LoRA seed must be in 0..2^64-1, got {self.seed}", field="seed")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise UserInputError(f"LoRA alpha must be a positive number, got {self.alpha}", field="alpha")
        if not (self.train_attn or self.train_mlp or self.train_unembed):
            raise UserInputError(
                "at least one of train_attn, train_mlp, train_unembed must be true", field="train_attn"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, config: LoraConfig) -> LoraSpec | None:
        """The adapter for the wire's `LoraConfig` (the one definition of the concept); None for rank 0
        (full fine-tuning). Raises `UserInputError` naming the `lora_config` field."""
        if config.rank == 0:
            return None
        try:
            return cls(
                rank=config.rank,
                seed=config.seed,
                train_attn=config.train_attn,
                train_mlp=config.train_mlp,
                train_unembed=config.train_unembed,
            )
        except UserInputError as exc:
            raise UserInputError(exc.message, field="lora_config") from None


@dataclass(frozen=True)
class AdapterRouting:
    """Which adapter applies where in the next forward passes.

    Either `single` (one adapter id, or None for the bare base model, over the whole batch) or
    `groups`: adapter id -> positions in the input flattened to (-1, features), as a 1-D LongTensor
    or, for a contiguous range, a `slice` (no gather or scatter then: the output is put together
    with one concatenation). Groups never overlap; positions in no group get the base model only.
    Or `rows`: adapter id -> 1-D LongTensor of batch rows (dim 0) of a (rows, ..., features) input,
    whatever its other dimensions (a model that keeps only its last positions' logits feeds its
    output layer fewer positions than its other layers).
    """

    single: str | None = None
    groups: tuple[tuple[str, torch.Tensor | slice], ...] = ()
    rows: tuple[tuple[str, torch.Tensor], ...] = ()

    @staticmethod
    def for_row_spans(spans: Sequence[tuple[str, int, int]], seq_len: int) -> AdapterRouting:
        """(adapter id, first row, end row) per contiguous block of rows of a (rows, seq_len, features) input."""
        return AdapterRouting(
            groups=tuple((a, slice(start * seq_len, end * seq_len)) for a, start, end in spans)
        )

    @staticmethod
    def for_rows(
        adapter_ids: Sequence[str | None], seq_len: int, device: torch.device | str = "cpu"
    ) -> AdapterRouting:
        """One adapter per batch row of a (rows, seq_len, features) input."""
        rows_by_adapter: dict[str, list[int]] = {}
        for row, adapter_id in enumerate(adapter_ids):
            if adapter_id is not None:
                rows_by_adapter.setdefault(adapter_id, []).append(row)
        groups = []
        offsets = torch.arange(seq_len, device=device)
        for adapter_id, rows in rows_by_adapter.items():
            starts = torch.tensor(rows, device=device, dtype=torch.long) * seq_len
            groups.append((adapter_id, (starts[:, None] + offsets[None, :]).reshape(-1)))
        return AdapterRouting(groups=tuple(groups))

    @staticmethod
    def by_batch_row(adapter_ids: Sequence[str | None], device: torch.device | str = "cpu") -> AdapterRouting:
        """One adapter per batch row (dim 0) of the input of every layer, whatever its sequence length."""
        rows_by_adapter: dict[str, list[int]] = {}
        for row, adapter_id in enumerate(adapter_ids):
            if adapter_id is not None:
                rows_by_adapter.setdefault(adapter_id, []).append(row)
        return AdapterRouting(
            rows=tuple(
                (a, torch.tensor(r, device=device, dtype=torch.long)) for a, r in rows_by_adapter.items()
            )
        )

    @staticmethod
    def for_tokens(
        adapter_per_token: Sequence[str | None], device: torch.device | str = "cpu"
    ) -> AdapterRouting:
        """One adapter per flattened token position (packed sequences)."""
        positions: dict[str, list[int]] = {}
        for pos, adapter_id in enumerate(adapter_per_token):
            if adapter_id is not None:
                positions.setdefault(adapter_id, []).append(pos)
        return AdapterRouting(
            groups=tuple((a, torch.tensor(p, device=device, dtype=torch.long)) for a, p in positions.items())
        )


_current_routing: contextvars.ContextVar[AdapterRouting | None] = contextvars.ContextVar(
    "tether_adapter_routing", default=None
)


@contextlib.contextmanager
def adapter_routing(routing: AdapterRouting | str | None) -> Iterator[None]:
    """Route forward passes run inside this block (in this thread) to the given adapter(s)."""
    if routing is None or isinstance(routing, str):
        routing = AdapterRouting(single=routing)
    token = _current_routing.set(routing)
    try:
        yield
    finally:
        _current_routing.reset(token)


@dataclass
class LoraWeights:
    """One adapter's factors on one linear layer: delta W = scale * B @ A."""

    lora_A: torch.Tensor  # (rank, in_features)
    lora_B: torch.Tensor  # (out_features, rank)
    scale: float


class MultiLoraLinear(nn.Module):
    """An `nn.Linear` plus any number of LoRA adapters, applied according to the current routing."""

    def __init__(self, base: nn.Linear, kind: str) -> None:
        super().__init__()
        self.base = base
        self.kind = kind
        self.adapters: dict[str, LoraWeights] = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        routing = _current_routing.get()
        if routing is None or not self.adapters:
            return out
        if routing.groups:
            return self._forward_groups(x, out, routing.groups)
        if routing.rows:
            return self._forward_rows(x, out, routing.rows)
        weights = self.adapters.get(routing.single) if routing.single is not None else None
        if weights is None:
            return out
        return out + _lora_delta(x, weights)

    def _forward_groups(
        self, x: torch.Tensor, out: torch.Tensor, groups: tuple[tuple[str, torch.Tensor | slice], ...]
    ) -> torch.Tensor:
        flat_x = x.reshape(-1, x.shape[-1])
        flat_out = out.reshape(-1, out.shape[-1])
        active = [(self.adapters[a], p) for a, p in groups if a in self.adapters]
        spans = [(weights, p) for weights, p in active if isinstance(p, slice)]
        if len(spans) == len(active):
            # split (not slicing or gathers): its backward is one concatenation, where each slice's or
            # gather's backward would build a zero tensor of the whole input per adapter
            segments: list[tuple[int, LoraWeights | None]] = []
            cursor = 0
            for weights, span in sorted(spans, key=lambda group: group[1].start):
                if span.stop <= span.start:
                    continue
                if span.start > cursor:
                    segments.append((span.start - cursor, None))
                segments.append((span.stop - span.start, weights))
                cursor = span.stop
            if not any(weights is not None for _, weights in segments):
                return out
            if cursor < flat_out.shape[0]:
                segments.append((flat_out.shape[0] - cursor, None))
            sizes = [size for size, _ in segments]
            pieces = [
                piece if weights is None else piece + _lora_delta(x_piece, weights)
                for piece, x_piece, (_, weights) in zip(
                    flat_out.split(sizes), flat_x.split(sizes), segments, strict=True
                )
            ]
            return torch.cat(pieces).reshape(out.shape)
        positions, deltas = [], []
        for weights, group in active:
            index = (
                group
                if isinstance(group, torch.Tensor)
                else torch.arange(group.start, group.stop, device=x.device)
            )
            if index.numel() == 0:
                continue
            positions.append(index)
            deltas.append(_lora_delta(flat_x.index_select(0, index), weights))
        if not positions:
            return out
        return flat_out.index_add(0, torch.cat(positions), torch.cat(deltas)).reshape(out.shape)

    def _forward_rows(
        self, x: torch.Tensor, out: torch.Tensor, rows: tuple[tuple[str, torch.Tensor], ...]
    ) -> torch.Tensor:
        active = [(self.adapters[a], r) for a, r in rows if a in self.adapters and r.numel()]
        if not active:
            return out
        deltas = [_lora_delta(x.index_select(0, r), weights) for weights, r in active]
        return out.index_add(0, torch.cat([r for _, r in active]), torch.cat(deltas))


def _lora_delta(x: torch.Tensor, weights: LoraWeights) -> torch.Tensor:
    """The adapter's contribution, computed in the adapter's dtype and returned in the input's."""
    x_lora = x.to(weights.lora_A.dtype)
    return ((x_lora @ weights.lora_A.T) @ weights.lora_B.T * weights.scale).to(x.dtype)


def _kind_of(name: str, module: nn.Module, output_embeddings: nn.Module | None) -> str | None:
    if module is output_embeddings:
        return "unembed"
    parts = name.lower().split(".")
    if any(marker in part for part in parts for marker in ATTENTION_MARKERS):
        return "attn"
    if any(marker in part for part in parts for marker in MLP_MARKERS):
        return "mlp"
    return None


def attach_lora_layers(model: nn.Module) -> list[MultiLoraLinear]:
    """Wrap every adaptable linear layer of `model` in place (idempotent); return the wrappers.

    Attention and MLP layers are found by module path (`...self_attn.q_proj`, `...mlp.up_proj`), the
    unembedding by `get_output_embeddings()`, which covers the Hugging Face causal LMs built from
    `nn.Linear`.
    """
    existing = [m for m in model.modules() if isinstance(m, MultiLoraLinear)]
    if existing:
        return existing
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    output_embeddings = get_output_embeddings() if get_output_embeddings is not None else None
    replacements = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            kind = _kind_of(name, module, output_embeddings)
            if kind is not None:
                replacements.append((name, module, kind))
    wrappers = []
    for name, module, kind in replacements:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MultiLoraLinear(module, kind)
        setattr(parent, child_name, wrapper)
        wrappers.append(wrapper)
    return wrappers


def lora_layers(model: nn.Module) -> list[tuple[str, MultiLoraLinear]]:
    """The wrapped layers of `model`, by module path, in a stable order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MultiLoraLinear)]


def add_adapter(
    model: nn.Module, adapter_id: str, spec: LoraSpec, *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Create adapter `adapter_id` on every layer its spec trains; return its trainable tensors by name.

    A is initialised like PEFT (Kaiming-uniform with a=sqrt(5)) from `spec.seed`; B is zero, so a new
    adapter leaves the model's outputs unchanged. Names are `<module path>.lora_A` / `.lora_B`
    (PEFT's layout without the adapter name), stable across runs. `dtype` defaults to the base
    weights' dtype; training passes float32 so a bf16 base model still gets fp32 adapter weights and
    optimizer moments (the delta is computed in the adapter's dtype, see `_lora_delta`).
    """
    layers = lora_layers(model) or [(n, m) for n, m in _named(attach_lora_layers(model), model)]
    if any(adapter_id in layer.adapters for _, layer in layers):
        raise UserInputError(f"adapter {adapter_id!r} already exists", field="model_id")
    wanted = {"attn": spec.train_attn, "mlp": spec.train_mlp, "unembed": spec.train_unembed}
    check_rank(spec, [layer for _, layer in layers if wanted[layer.kind]])
    generator = torch.Generator(device="cpu")
    generator.manual_seed(spec.seed if spec.seed is not None else 0)
    params: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        if not wanted[layer.kind]:
            continue
        base_weight = layer.base.weight
        lora_A = torch.empty(spec.rank, layer.in_features, dtype=torch.float32)
        bound = 1.0 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5)) bound for fan_in
        lora_A.uniform_(-bound, bound, generator=generator)
        adapter_dtype = dtype or base_weight.dtype
        lora_A = lora_A.to(device=base_weight.device, dtype=adapter_dtype).requires_grad_(True)
        lora_B = torch.zeros(
            layer.out_features, spec.rank, device=base_weight.device, dtype=adapter_dtype, requires_grad=True
        )
        layer.adapters[adapter_id] = LoraWeights(lora_A, lora_B, spec.scale)
        params[f"{name}.lora_A"] = lora_A
        params[f"{name}.lora_B"] = lora_B
    return params


def max_lora_rank(layers: Sequence[MultiLoraLinear]) -> int:
    """The largest useful rank on `layers`: min(in, out) of the smallest (B·A cannot exceed it)."""
    return min((min(layer.in_features, layer.out_features) for layer in layers), default=0)


def check_rank(spec: LoraSpec, layers: Sequence[MultiLoraLinear]) -> None:
    """UserInputError (field `rank`) unless `spec.rank` fits every layer it adapts; nothing is allocated."""
    if not layers:
        raise UserInputError("the model has no layer of the kinds this adapter trains", field="train_attn")
    limit = max_lora_rank(layers)
    if spec.rank > limit:
        raise UserInputError(
            f"LoRA rank {spec.rank} is more than the {limit} this model's adapted layers allow "
            "(min of in and out features)",
            field="rank",
        )


def remove_adapter(model: nn.Module, adapter_id: str) -> None:
    """Drop adapter `adapter_id` from every layer (no-op where it is absent)."""
    for _, layer in lora_layers(model):
        layer.adapters.pop(adapter_id, None)


def adapter_tensors(model: nn.Module, adapter_id: str) -> dict[str, torch.Tensor]:
    """The adapter's live tensors by the names `add_adapter` returned."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        weights = layer.adapters.get(adapter_id)
        if weights is not None:
            out[f"{name}.lora_A"] = weights.lora_A
            out[f"{name}.lora_B"] = weights.lora_B
    return out


def _named(wrappers: list[MultiLoraLinear], model: nn.Module) -> list[tuple[str, MultiLoraLinear]]:
    ids = {id(w) for w in wrappers}
    return [(n, m) for n, m in model.named_modules() if id(m) in ids]
