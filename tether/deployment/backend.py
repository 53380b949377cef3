"""The seam between a deployment and what actually runs the model.

A backend holds weight versions by name and samples from one of them. `EngineBackend` runs
tether's own sampling engine (CPU or one GPU); a vLLM backend can implement the same protocol
behind an optional extra without the deployment's hot-load or HTTP code changing.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import asdict
from typing import Protocol

import torch

from tether.engine.lora import LoraSpec
from tether.engine.model_loading import LoadedBaseModel
from tether.engine.sampling import SampleRequest, SampleResult, SamplingEngine
from tether.engine.sampling.engine import TokenCallback
from tether.storage.formats import LoraLayout


class ServingBackend(Protocol):
    """Weight versions by name, and sampling from one of them (None = the bare base model)."""

    def load(self, version: str, tensors: dict[str, torch.Tensor], lora: LoraLayout | None) -> None:
        """Make `tensors` servable as `version` (UserInputError if they do not fit the base model)."""

    def unload(self, version: str) -> None:
        """Stop new requests on `version`; it is freed when its running requests finish."""

    def submit(
        self, request: SampleRequest, version: str | None, on_token: TokenCallback | None = None
    ) -> Future[SampleResult]:
        """Sample from `version` (UserInputError for a bad request); `on_token` sees each token as
        it is generated (`tether.engine.sampling.engine.TokenCallback`). Cancelling the future
        (`future.cancel()`, also when an awaiting task is cancelled) stops the request and frees
        what it holds; a backend whose futures cannot be cancelled returns False there."""

    def close(self) -> None: ...


class EngineBackend:
    """tether's continuous-batching sampling engine on the loaded base model."""

    def __init__(self, base: LoadedBaseModel, **engine_options: int) -> None:
        self.base = base
        self.engine = SamplingEngine(base, **engine_options)

    def load(self, version: str, tensors: dict[str, torch.Tensor], lora: LoraLayout | None) -> None:
        if lora is not None:
            self.engine.register_lora(version, LoraSpec(rank=lora.rank, alpha=lora.alpha), tensors)
        else:
            self.engine.register_full(version, tensors)

    def unload(self, version: str) -> None:
        self.engine.unregister(version)

    def submit(
        self, request: SampleRequest, version: str | None, on_token: TokenCallback | None = None
    ) -> Future[SampleResult]:
        request.weights_id = version
        return self.engine.submit(request, on_token=on_token)

    def stats(self) -> dict[str, int]:
        """Requests waiting and running, KV tokens reserved, and how many completed, failed or were
        cancelled (`tether.engine.sampling.engine.EngineStats`)."""
        return asdict(self.engine.stats())

    def close(self) -> None:
        self.engine.close()
