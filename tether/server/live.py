"""The server's in-memory view of live training models and sampling sessions.

A live model is a training client's model on some base model's trainer; a live sampler is a
sampling session (the base model, or weights registered with the trainer under its id). Both die
with the process, while their checkpoints live on in the catalogue. This module holds what the
server needs to route and authorize requests; the weights themselves live in the trainer.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from tether.types.errors import NotFoundError


@dataclass
class LiveModel:
    """A training client's model."""

    model_id: str
    owner: str
    session_id: str
    base_model: str
    is_lora: bool
    lora_rank: int
    lora_config: dict[str, Any]
    optimizer_config: dict[str, Any] = field(default_factory=lambda: {"type": "adamw"})


@dataclass
class LiveSampler:
    """A sampling session: a base model plus, unless it samples the base, weights registered in the trainer."""

    sampler_id: str
    owner: str
    session_id: str
    base_model: str
    model_path: str | None
    has_weights: bool
    clients_joined: int = 0

    def next_client_counter(self) -> int:
        self.clients_joined += 1
        return self.clients_joined


class LiveObjects:
    """Live models and samplers, and the samples pending per base model; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, LiveModel] = {}
        self._samplers: dict[str, LiveSampler] = {}
        self._pending_samples: dict[str, int] = {}
        self._ephemeral: dict[str, list[str]] = {}
        """Per training model, its sampling sessions made from its live weights, oldest first."""
        self._released: OrderedDict[str, str] = OrderedDict()
        """Recently released sampler ids -> why (a bounded memory, for a clear 404)."""

    # ---- models ------------------------------------------------------------------------------

    def add_model(self, model: LiveModel) -> None:
        with self._lock:
            self._models[model.model_id] = model

    def model(self, model_id: str, owner: str) -> LiveModel:
        with self._lock:
            model = self._models.get(model_id)
        if model is None or model.owner != owner:
            raise NotFoundError(f"unknown model_id {model_id!r} (create it first, or its session expired)")
        return model

    def has_model(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._models

    def remove_model(self, model_id: str) -> LiveModel | None:
        with self._lock:
            return self._models.pop(model_id, None)

    def models_of_session(self, session_id: str) -> list[LiveModel]:
        with self._lock:
            return [m for m in self._models.values() if m.session_id == session_id]

    # ---- samplers ----------------------------------------------------------------------------

    def add_sampler(self, sampler: LiveSampler) -> None:
        with self._lock:
            self._samplers[sampler.sampler_id] = sampler

    def sampler(self, sampler_id: str, owner: str) -> LiveSampler:
        with self._lock:
            sampler = self._samplers.get(sampler_id)
            released = self._released.get(sampler_id)
        if sampler is None or sampler.owner != owner:
            why = f" ({released})" if released is not None and (sampler is None) else ""
            raise NotFoundError(f"unknown sampling_session_id {sampler_id!r}{why}")
        return sampler

    def add_ephemeral(self, model_id: str, sampler_id: str, keep: int) -> list[str]:
        """Record a sampler made from `model_id`'s live weights; return the older ones beyond `keep` to release."""
        with self._lock:
            made = self._ephemeral.setdefault(model_id, [])
            if sampler_id not in made:
                made.append(sampler_id)
            evicted, made[:] = made[:-keep], made[-keep:]
            for old in evicted:
                self._released[old] = (
                    f"released: model {model_id!r} keeps its {keep} newest sampling clients; "
                    "save weights again to sample the current ones"
                )
                while len(self._released) > 4096:
                    self._released.popitem(last=False)
            return evicted

    def forget_ephemeral(self, model_id: str) -> list[str]:
        with self._lock:
            return self._ephemeral.pop(model_id, [])

    def has_sampler(self, sampler_id: str) -> bool:
        with self._lock:
            return sampler_id in self._samplers

    def remove_sampler(self, sampler_id: str) -> LiveSampler | None:
        with self._lock:
            return self._samplers.pop(sampler_id, None)

    def samplers_of_session(self, session_id: str) -> list[LiveSampler]:
        with self._lock:
            return [s for s in self._samplers.values() if s.session_id == session_id]

    # ---- back-pressure -----------------------------------------------------------------------

    def reserve_samples(self, base_model: str, count: int, limit: int) -> bool:
        """Count `count` samples as pending on `base_model` unless that would pass `limit`."""
        with self._lock:
            pending = self._pending_samples.get(base_model, 0)
            if pending > 0 and pending + count > limit:
                return False
            self._pending_samples[base_model] = pending + count
            return True

    def release_samples(self, base_model: str, count: int) -> None:
        with self._lock:
            self._pending_samples[base_model] = self._pending_samples.get(base_model, 0) - count
