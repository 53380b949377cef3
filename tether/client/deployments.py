"""Deployments from the SDK, shaped like Fireworks' training SDK: DeploymentManager, DeploymentConfig,
DeploymentSampler and WeightSyncer, against `tether serve`'s `/api/v1/tether/deployments` routes.

    manager = DeploymentManager("http://127.0.0.1:8000", api_key="tml-...")
    manager.create_or_get(DeploymentConfig(deployment_id="my-run", base_model="tether/tiny-qwen3"))
    manager.wait_for_ready("my-run")
    manager.hotload_and_wait("my-run", "tether/tiny-qwen3", saved.path)      # a tinker:// sampler path
    sampler = DeploymentSampler(manager.base_url, "my-run", api_key="tml-...")
    [completion] = asyncio.run(sampler.sample_with_prompt_tokens([1, 2, 3], max_tokens=8))

Snapshots are named by the `tinker://` path `save_weights_for_sampler(_ext)` returned; a
deployment reports the identity it serves in `current_snapshot_identity`. Errors are tether's typed
errors (NotFoundError for an unknown deployment or checkpoint, ConflictError for a hot-load
already running, UserInputError for bad input). This module depends on httpx and `tether.types`.
"""

from __future__ import annotations

import asyncio
import numbers
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from tether.types.errors import (
    ConflictError,
    NotFoundError,
    OverloadedError,
    ServerError,
    TetherError,
    UserInputError,
)

__all__ = [
    "DeploymentConfig",
    "DeploymentInfo",
    "DeploymentManager",
    "DeploymentSampler",
    "SampledCompletion",
    "WeightSyncer",
]

_PREFIX = "/api/v1/tether/deployments"
_ERRORS: dict[int, type[TetherError]] = {
    400: UserInputError,
    404: NotFoundError,
    409: ConflictError,
    422: UserInputError,
    429: OverloadedError,
}


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        detail = response.json().get("detail") or response.text
    except ValueError:
        detail = response.text
    raise _ERRORS.get(response.status_code, ServerError)(str(detail))


@dataclass
class DeploymentConfig:
    """What to deploy. Replica counts are 0 or 1 (one serving process per deployment)."""

    deployment_id: str
    base_model: str
    description: str | None = None
    hot_load_trainer_job: str | None = None
    """The training run (or trainer job) whose checkpoints will be hot-loaded; recorded only."""
    hot_load_transition_type: str = "ASYNC"
    """ASYNC: running requests finish on the old weights, new ones get the new. SYNC: new requests
    pause until running ones finish, then resume on the new weights."""
    min_replica_count: int = 0
    max_replica_count: int = 1


@dataclass
class DeploymentInfo:
    deployment_id: str
    base_model: str
    state: str
    """CREATING | READY | FAILED."""
    hot_load_transition_type: str = "ASYNC"
    current_snapshot_identity: str | None = None
    error: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @staticmethod
    def from_json(data: dict[str, Any]) -> DeploymentInfo:
        return DeploymentInfo(
            deployment_id=data["deployment_id"],
            base_model=data["base_model"],
            state=data["state"],
            hot_load_transition_type=data.get("hot_load_transition_type", "ASYNC"),
            current_snapshot_identity=data.get("current_snapshot_identity"),
            error=data.get("error"),
            raw=data,
        )


class DeploymentManager:
    """Create, watch, hot-load and delete deployments (synchronous HTTP)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout_s: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or "tml-local"
        self.last_hotload_error_message: str | None = None
        self._http = httpx.Client(
            base_url=self.base_url, headers={"X-API-Key": self.api_key}, timeout=timeout_s
        )

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        response = self._http.request(method, f"{_PREFIX}{path}", **kw)
        _raise_for(response)
        return response.json()

    def create_or_get(self, config: DeploymentConfig, force_recreate: bool = False) -> DeploymentInfo:
        """Create the deployment, or return the existing one (a FAILED one, or any with
        `force_recreate`, is deleted and created again)."""
        existing = self.get(config.deployment_id)
        if existing is not None and (force_recreate or existing.state == "FAILED"):
            self.delete(config.deployment_id)
            existing = None
        if existing is not None:
            return existing
        try:
            return DeploymentInfo.from_json(self._call("POST", "", json=asdict(config)))
        except ConflictError:
            found = self.get(config.deployment_id)
            if found is None:
                raise
            return found

    def get(self, deployment_id: str) -> DeploymentInfo | None:
        try:
            return DeploymentInfo.from_json(self._call("GET", f"/{deployment_id}"))
        except NotFoundError:
            return None

    def list(self) -> list[DeploymentInfo]:
        return [DeploymentInfo.from_json(d) for d in self._call("GET", "")["deployments"]]

    def delete(self, deployment_id: str) -> None:
        """Stop and forget the deployment (already gone is fine)."""
        try:
            self._call("DELETE", f"/{deployment_id}")
        except NotFoundError:
            pass

    def restart(self, deployment_id: str) -> DeploymentInfo:
        """Start the deployment's serving process again (after it FAILED), on the last weights it
        loaded; `create_or_get` would start a new one on the base model. NotFoundError if unknown."""
        return DeploymentInfo.from_json(self._call("POST", f"/{deployment_id}/restart"))

    def wait_for_ready(
        self, deployment_id: str, timeout_s: float = 600, poll_interval_s: float = 0.5
    ) -> DeploymentInfo:
        """Poll until READY; ServerError if it FAILED, TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.get(deployment_id)
            if info is None:
                raise NotFoundError(f"deployment {deployment_id!r} does not exist")
            if info.state == "READY":
                return info
            if info.state == "FAILED":
                raise ServerError(f"deployment {deployment_id!r} failed: {info.error}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"deployment {deployment_id!r} not ready after {timeout_s} s ({info.state})"
                )
            time.sleep(poll_interval_s)

    def warmup(self, model: str, max_retries: int = 30, retry_interval_s: float = 1.0) -> bool:
        """Send a token-in probe (`prompt [1, 2]`, 4 tokens, greedy) until it answers 200."""
        for _ in range(max_retries):
            response = self._http.post(
                f"{_PREFIX}/{model}/v1/completions",
                json={"model": model, "prompt": [1, 2], "max_tokens": 4, "temperature": 0},
            )
            if response.status_code == 200:
                return True
            time.sleep(retry_interval_s)
        return False

    def hotload(
        self,
        deployment_id: str,
        base_model: str,
        snapshot_identity: str,
        incremental_snapshot_metadata: dict[str, Any] | None = None,
        reset_prompt_cache: bool = True,
        timeout: float = 60,
        path: str | None = None,
        transition: str | None = None,
    ) -> dict[str, Any]:
        """Ask the deployment to load a sampler checkpoint (`snapshot_identity` = its tinker:// path,
        unless `path` gives the path and the identity is a label). Returns the hot-load status."""
        return self._call(
            "POST",
            f"/{deployment_id}/hot_load",
            timeout=timeout,
            json={
                "identity": snapshot_identity,
                "path": path,
                "reset_prompt_cache": reset_prompt_cache,
                "incremental_snapshot_metadata": incremental_snapshot_metadata,
                "transition": transition,
            },
        )

    def hotload_check_status(
        self, deployment_id: str, base_model: str = "", timeout: float = 30
    ) -> dict[str, Any]:
        return self._call("GET", f"/{deployment_id}/hot_load", timeout=timeout)

    def wait_for_hotload(
        self,
        deployment_id: str,
        base_model: str,
        expected_identity: str,
        timeout_seconds: float = 400,
        poll_interval: float = 0.2,
    ) -> bool:
        """True once the deployment serves `expected_identity`; raises ServerError if that load failed
        or the deployment FAILED (its serving process died: `restart` resumes its last good weights).

        Polls every 20 ms at first, backing off to `poll_interval` (s), so a fast hot-load is seen
        almost as soon as it is done.
        """
        deadline = time.monotonic() + timeout_seconds
        interval = min(0.02, poll_interval)
        while time.monotonic() < deadline:
            status = self.hotload_check_status(deployment_id, base_model)
            if status.get("state") == "FAILED":
                self.last_hotload_error_message = status.get("error")
                raise ServerError(
                    f"deployment {deployment_id!r} FAILED while waiting for {expected_identity}: "
                    f"{status.get('error')}"
                )
            replicas = status.get("replicas") or []
            if replicas:
                replica = replicas[0]
                loading = replica.get("loading_state") or {}
                if replica.get("readiness") and replica.get("current_snapshot_identity") == expected_identity:
                    self.last_hotload_error_message = None
                    return True
                if (
                    loading.get("stage") == "error"
                    and loading.get("target_snapshot_identity") == expected_identity
                ):
                    self.last_hotload_error_message = loading.get("error")
                    raise ServerError(f"hot-load of {expected_identity} failed: {loading.get('error')}")
            time.sleep(interval)
            interval = min(interval * 2, poll_interval)
        return False

    def hotload_and_wait(
        self,
        deployment_id: str,
        base_model: str,
        snapshot_identity: str,
        incremental_snapshot_metadata: dict[str, Any] | None = None,
        reset_prompt_cache: bool = True,
        timeout_seconds: float = 400,
        path: str | None = None,
        transition: str | None = None,
    ) -> bool:
        self.hotload(
            deployment_id,
            base_model,
            snapshot_identity,
            incremental_snapshot_metadata,
            reset_prompt_cache,
            path=path,
            transition=transition,
        )
        return self.wait_for_hotload(deployment_id, base_model, snapshot_identity, timeout_seconds)


@dataclass
class SampledCompletion:
    """One completion of a token-in request."""

    text: str
    full_tokens: list[int]
    """Prompt + completion token ids."""
    prompt_len: int
    finish_reason: str
    completion_len: int
    inference_logprobs: list[float]
    """Untempered logprob of each completion token."""
    weights_identity: str | None = None


class DeploymentSampler:
    """Token-in/token-out sampling from one deployment, at most `max_concurrency` requests at a time.

    Requests go through the control plane's proxy to the deployment's `/v1/completions` with token
    ids as the prompt; 425/429/503 answers (a hot-load in progress, a full queue) are retried.
    """

    def __init__(
        self,
        base_url: str,
        deployment_id: str,
        api_key: str | None = None,
        tokenizer: Any = None,
        *,
        max_concurrency: int = 8,
        retries: int = 10,
        retry_interval_s: float = 0.5,
    ) -> None:
        self.url = f"{base_url.rstrip('/')}{_PREFIX}/{deployment_id}/v1/completions"
        self.model = deployment_id
        self.headers = {"X-API-Key": api_key or "tml-local"}
        self.tokenizer = tokenizer
        self.max_concurrency = max_concurrency
        self.retries = retries
        self.retry_interval_s = retry_interval_s
        self._semaphores: dict[int, asyncio.Semaphore] = {}
        self.in_flight = 0
        self.max_in_flight_seen = 0

    def _semaphore(self) -> asyncio.Semaphore:
        loop_id = id(asyncio.get_running_loop())
        if loop_id not in self._semaphores:
            self._semaphores[loop_id] = asyncio.Semaphore(self.max_concurrency)
        return self._semaphores[loop_id]

    async def sample_with_prompt_tokens(
        self,
        prompt_token_ids: Sequence[int],
        n: int = 1,
        max_tokens: int = 1024,
        temperature: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        **extra: Any,
    ) -> list[SampledCompletion]:
        """`n` independent completions of the prompt (one request each, under the concurrency cap).

        UserInputError for `n` < 1 or a prompt that is not token ids (before anything is sent)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserInputError(f"must be an integer >= 1, got {n!r}", field="n")
        if len(prompt_token_ids) == 0 or not all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt_token_ids
        ):  # a float or bool would be truncated to some other token without a word
            raise UserInputError("must be a non-empty list of integer token ids", field="prompt_token_ids")
        prompt = [int(t) for t in prompt_token_ids]
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": 1.0,
            "logprobs": 0,
            "stop": list(stop) if stop else None,
            **extra,
        }
        results = await asyncio.gather(
            *(self._one(body, None if seed is None else seed + i) for i in range(n))
        )
        return [r for result in results for r in result]

    async def sample_with_tokens(
        self,
        messages: list[dict[str, Any]],
        n: int = 1,
        max_tokens: int = 1024,
        temperature: float = 1.0,
        **extra: Any,
    ) -> list[SampledCompletion]:
        """Apply the tokenizer's chat template (generation prompt added), then sample token in/out."""
        if self.tokenizer is None:
            raise UserInputError("sample_with_tokens needs a tokenizer", field="tokenizer")
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        tokens = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
        return await self.sample_with_prompt_tokens(
            tokens, n=n, max_tokens=max_tokens, temperature=temperature, **extra
        )

    async def _one(self, body: dict[str, Any], seed: int | None) -> list[SampledCompletion]:
        payload = dict(body, seed=seed)
        async with self._semaphore():
            self.in_flight += 1
            self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
            try:
                async with httpx.AsyncClient(timeout=600) as client:
                    for attempt in range(self.retries + 1):
                        response = await client.post(self.url, json=payload, headers=self.headers)
                        if response.status_code not in (425, 429, 503) or attempt == self.retries:
                            break
                        await asyncio.sleep(self.retry_interval_s)
            finally:
                self.in_flight -= 1
        _raise_for(response)
        data = response.json()
        out = []
        for choice in data["choices"]:
            raw = choice["raw_output"]
            completion = list(raw["completion_token_ids"])
            logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
            out.append(
                SampledCompletion(
                    text=choice["text"],
                    full_tokens=list(raw["prompt_token_ids"]) + completion,
                    prompt_len=len(raw["prompt_token_ids"]),
                    finish_reason=choice["finish_reason"],
                    completion_len=len(completion),
                    inference_logprobs=list(logprobs),
                    weights_identity=data.get("weights_identity"),
                )
            )
        return out


@dataclass
class WeightSyncer:
    """Save sampler weights and hot-load them onto a deployment, one call per step, with delta chains.

    `policy_client` needs `save_weights_for_sampler_ext(name, checkpoint_type=...)` returning an
    object (or dict) with `path` and, optionally, `checkpoint_type`, `stored_bytes`, `full_bytes`.
    The first save is a base; each later save is a delta against the previous save (the chain's
    parent, which the deployment serves by then), until `rebase_every` deltas have been sent or a
    delta's size exceeds `rebase_fraction` of a full save, when the next save is a fresh base. A
    delta's hot-load names its parent in `incremental_snapshot_metadata.previous_snapshot_identity`
    (`base_identity`: the last snapshot the deployment loaded, as Fireworks' SDK keeps it), which the
    server checks against what the deployment serves. After each hot-load the deployment must report
    the saved path as the identity it serves (verification); a failed hot-load raises and the next
    save is a base again.

    `rebase_fraction` (default 0.8): a delta that saves less than a fifth of a full save is not worth
    another link in the chain (each link is applied in order when a deployment restarts). One-step
    deltas measured by bench/delta_size.py: bf16 weights 1/7 to 1/40 of full; fp32 weights ~1/2.4
    (lr 1e-5) to ~1/1.9 (lr 1e-4), so with a threshold of 0.5 fp32 runs at lr 1e-4 would alternate
    base, delta, base.
    """

    policy_client: Any
    deploy_mgr: DeploymentManager
    deployment_id: str
    base_model: str = ""
    hotload_timeout: float = 600
    rebase_every: int | None = 20
    rebase_fraction: float | None = 0.8
    lora: bool = False
    """Save LoRA adapters as merged full weights (`merged_base`) so any server can load them."""
    base_saved: bool = False
    deltas_since_base: int = 0
    base_identity: str | None = None
    last_timing: dict[str, float] = field(default_factory=dict)

    def _next_type(self, explicit: str | None) -> str:
        if explicit is not None:
            return explicit
        if not self.base_saved or (
            self.rebase_every is not None and self.deltas_since_base >= self.rebase_every
        ):
            return "merged_base" if self.lora else "base"
        return "delta"

    def save_only(self, name: str, checkpoint_type: str | None = None) -> tuple[str, str]:
        """Save (no hot-load); returns (tinker path, checkpoint type written). UserInputError if
        `policy_client` cannot save base/delta checkpoints (before anything is sent)."""
        kind = self._next_type(checkpoint_type)
        save = getattr(self.policy_client, "save_weights_for_sampler_ext", None)
        if save is None:  # e.g. the official tinker SDK's TrainingClient: an AttributeError said no more
            raise UserInputError(
                f"{type(self.policy_client).__name__} has no save_weights_for_sampler_ext (base/delta "
                "saves): use a tether TrainingClient (tether.ServiceClient), or save with "
                "save_weights_for_sampler and hot-load its path with DeploymentManager.hotload_and_wait",
                field="policy_client",
            )
        result = save(name, checkpoint_type=kind)
        if hasattr(result, "result"):  # tether's TrainingClient answers a future
            result = result.result()
        get = result.get if isinstance(result, dict) else lambda k, d=None: getattr(result, k, d)
        path, written = get("path"), get("checkpoint_type", kind) or kind
        if not isinstance(path, str):
            raise ServerError(f"save_weights_for_sampler_ext answered without a path: {result!r}")
        if written == "delta":
            self.deltas_since_base += 1
            stored, full = get("stored_bytes"), get("full_bytes")
            if self.rebase_fraction is not None and stored and full and stored > self.rebase_fraction * full:
                self.deltas_since_base = self.rebase_every or 10**9  # the next one is a base
        else:
            self.base_saved, self.deltas_since_base = True, 0
        return path, written

    def save_and_hotload(self, name: str, checkpoint_type: str | None = None) -> str:
        """Save, hot-load and verify; returns the path now served. Raises on failure."""
        started = time.monotonic()
        path, written = self.save_only(name, checkpoint_type)
        saved = time.monotonic()
        metadata = (
            {"previous_snapshot_identity": self.base_identity, "compression_format": "xor_byteplanes_zstd"}
            if written == "delta" and self.base_identity
            else None
        )
        try:
            ok = self.deploy_mgr.hotload_and_wait(
                self.deployment_id, self.base_model, path, metadata, timeout_seconds=self.hotload_timeout
            )
        except TetherError:
            self.reset_delta_chain()
            raise
        if not ok:
            self.reset_delta_chain()
            raise ServerError(
                f"deployment {self.deployment_id} did not load {path} within {self.hotload_timeout} s"
            )
        self.verify(path)
        self.base_identity = path  # the next delta's parent: what the deployment now serves
        done = time.monotonic()
        self.last_timing = {
            "save_time_s": saved - started,
            "hotload_time_s": done - saved,
            "total_time_s": done - started,
        }
        return path

    def verify(self, path: str) -> None:
        """ServerError unless the deployment serves `path`."""
        info = self.deploy_mgr.get(self.deployment_id)
        if info is None or info.current_snapshot_identity != path:
            raise ServerError(
                f"deployment {self.deployment_id} serves "
                f"{info.current_snapshot_identity if info else None}, not {path}"
            )

    def reset_delta_chain(self) -> None:
        """The next save is a base (after a failure or a deployment change)."""
        self.base_saved, self.deltas_since_base, self.base_identity = False, 0, None

    def get_deployment_sampler(self, tokenizer: Any = None, **kw: Any) -> DeploymentSampler:
        return DeploymentSampler(
            self.deploy_mgr.base_url, self.deployment_id, self.deploy_mgr.api_key, tokenizer, **kw
        )
