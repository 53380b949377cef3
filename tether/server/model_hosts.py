"""Which base models this server hosts, and the live models and sampling sessions on them.

A `ModelHost` is one base model with its training engine, its sampling engine and the worker thread
that runs the training operations in order. Hosts load on first use, so the server starts at once.
Live models (training clients) and samplers are in-memory: they die with the process, while their
checkpoints live on in the catalogue. The engines are imported lazily because the server's modules
must not need torch at import time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tether.engine.worker import DedupeRegistry, ModelWorker
from tether.server.config import ServerConfig
from tether.types.errors import NotFoundError, UserInputError

if TYPE_CHECKING:
    from tether.engine.model_loading import LoadedBaseModel


def creation_stream(model_id: str) -> str:
    """The dedupe stream of a model's creating request (create_model or create-via-load)."""
    return f"{model_id}#create"


class ModelHost:
    """One base model: loaded weights, training engine, sampling engine, ordered worker."""

    def __init__(self, name: str, config: ServerConfig) -> None:
        self.name = name
        self._config = config
        self._lock = threading.Lock()
        self._base: LoadedBaseModel | None = None
        self._training: Any = None
        self._sampling: Any = None
        self.worker = ModelWorker(name)
        self._pending_samples = 0

    def reserve_samples(self, count: int, limit: int) -> bool:
        """Count `count` samples as pending unless that would pass `limit` (back-pressure)."""
        with self._lock:
            if self._pending_samples > 0 and self._pending_samples + count > limit:
                return False
            self._pending_samples += count
            return True

    def release_samples(self, count: int) -> None:
        with self._lock:
            self._pending_samples -= count

    @property
    def base(self) -> LoadedBaseModel:
        with self._lock:
            if self._base is None:
                from tether.engine.model_loading import load_base_model

                if self._config.torch_threads is not None:
                    import torch

                    torch.set_num_threads(self._config.torch_threads)

                self._base = load_base_model(
                    self.name,
                    aliases=self._config.model_aliases,
                    device=self._config.device,
                    dtype=self._config.dtype,
                )
            return self._base

    @property
    def training(self) -> Any:
        """The `TrainingEngine` of this base model (created on first use)."""
        base = self.base
        with self._lock:
            if self._training is None:
                from tether.engine.training_engine import TrainingEngine

                self._training = TrainingEngine(base, max_tokens_per_micro_batch=self._config.max_tokens_per_micro_batch)
            return self._training

    @property
    def sampling(self) -> Any:
        """The `SamplingEngine` of this base model (created on first use)."""
        base = self.base
        with self._lock:
            if self._sampling is None:
                from tether.engine.sampling import SamplingEngine

                self._sampling = SamplingEngine(base, kv_cache_budget_tokens=self._config.kv_cache_budget_tokens)
            return self._sampling

    def close(self) -> None:
        self.worker.close()
        with self._lock:
            if self._sampling is not None:
                self._sampling.close()


@dataclass
class LiveModel:
    """A training client's model on a host."""

    model_id: str
    owner: str
    session_id: str
    host: ModelHost
    base_model: str
    is_lora: bool
    lora_rank: int
    lora_config: dict[str, Any]
    optimizer_config: dict[str, Any] = field(default_factory=lambda: {"type": "adamw"})


@dataclass
class LiveSampler:
    """A sampling session: a base model plus, unless it samples the base, registered weights."""

    sampler_id: str
    owner: str
    session_id: str
    host: ModelHost
    base_model: str
    model_path: str | None
    weights_id: str | None
    clients_joined: int = 0

    def next_client_counter(self) -> int:
        self.clients_joined += 1
        return self.clients_joined


class ModelHosts:
    """All hosts, live models and samplers of the server; thread-safe."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._hosts: dict[str, ModelHost] = {}
        self._models: dict[str, LiveModel] = {}
        self._samplers: dict[str, LiveSampler] = {}
        self.dedupe = DedupeRegistry()
        """Repeats of `(sampling_session_id, seq_id)` and of model creations, which bypass the workers."""

    @property
    def served_names(self) -> list[str]:
        return list(self._config.models)

    def host(self, name: str, *, field_name: str = "base_model") -> ModelHost:
        """The host serving `name`, loading it on first use; UserInputError if not served."""
        if name not in self._config.models:
            raise UserInputError(f"model {name!r} is not served here (served: {self._config.models})", field=field_name)
        with self._lock:
            host = self._hosts.get(name)
            if host is None:
                host = self._hosts[name] = ModelHost(name, self._config)
        return host

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

    def add_sampler(self, sampler: LiveSampler) -> None:
        with self._lock:
            self._samplers[sampler.sampler_id] = sampler

    def sampler(self, sampler_id: str, owner: str) -> LiveSampler:
        with self._lock:
            sampler = self._samplers.get(sampler_id)
        if sampler is None or sampler.owner != owner:
            raise NotFoundError(f"unknown sampling_session_id {sampler_id!r}")
        return sampler

    def has_sampler(self, sampler_id: str) -> bool:
        with self._lock:
            return sampler_id in self._samplers

    def remove_sampler(self, sampler_id: str) -> LiveSampler | None:
        with self._lock:
            return self._samplers.pop(sampler_id, None)

    def samplers_of_session(self, session_id: str) -> list[LiveSampler]:
        with self._lock:
            return [s for s in self._samplers.values() if s.session_id == session_id]

    def loaded_hosts(self) -> list[ModelHost]:
        with self._lock:
            return list(self._hosts.values())

    def close(self) -> None:
        for host in self.loaded_hosts():
            host.close()
