"""Which weights a deployment serves, and hot-loading new ones without a restart.

A hot-load reads a chain checkpoint directory (`tether.storage.sampler_chain`): a base or merged
base (or plain sampler weights without a chain record, `read_checkpoint`) is loaded as is; a delta is applied to the weights the deployment serves, and refused unless
those are its parent (the chain's previous checkpoint). Every file is checked against its manifest's sha256 and the rebuilt weights against
the recorded fingerprint before anything changes, so a wrong, truncated or corrupted checkpoint
fails with its cause in the status while the previous weights keep serving.

Transitions:

* ASYNC — requests already running finish on the old weights; requests that arrive after the
  switch get the new ones; nobody waits.
* SYNC — from the moment the new weights are ready, new requests pause; once the running ones
  have finished on the old weights, the switch happens and the paused requests resume on the new
  weights. No request ever sees two versions.

Either way a request is served entirely by one version, and each answer names it. After every
successful hot-load the chain of checkpoints that rebuilds the served weights is recorded in
`<state_dir>/served.json` (atomic replace), so a deployment that crashes mid-hot-load restarts on
its last good weights.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tether.deployment.backend import ServingBackend
from tether.engine.sampling import SampleRequest, SampleResult
from tether.engine.sampling.engine import TokenCallback
from tether.storage.delta import DeltaBaseMismatchError, fingerprint
from tether.storage.formats import HF_WEIGHTS_KIND, LoraLayout, read_hf_weights
from tether.storage.manifest import read_manifest
from tether.storage.sampler_chain import ChainLink, SamplerCheckpoint, read_sampler_checkpoint_dir
from tether.types.errors import ConflictError, NotFoundError, TetherError, UserInputError

log = logging.getLogger("tether.deployment")

Transition = Literal["SYNC", "ASYNC"]
TRANSITIONS = ("SYNC", "ASYNC")
BASE_IDENTITY = "base-model"
"""The identity reported while the deployment serves its bare base model."""
_STATE_FILE = "served.json"
_HISTORY_FILE = "hot_loads.jsonl"
HISTORY_LIMIT = 100
"""Finished hot-loads kept in the status (the file keeps them all, one JSON line each)."""


@dataclass
class ServedVersion:
    """One loaded weight version."""

    identity: str
    version: str | None
    """The backend's name for it (None = the bare base model)."""
    checkpoint_type: str = "none"
    path: str = ""
    chain: list[str] = field(default_factory=list)
    """Checkpoint directories applied in order to get these weights: the base, then each delta."""
    weights_fingerprint: str = ""
    base_identity: str = ""
    loaded_at: float = field(default_factory=time.time)

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "version"}


@dataclass
class LoadingState:
    stage: str = "idle"
    """idle | loading | done | error."""
    target_snapshot_identity: str | None = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None


@dataclass
class _Held:
    """The full tensors of the version served (a delta applies to them)."""

    link: ChainLink
    tensors: dict[str, torch.Tensor]
    lora: LoraLayout | None
    chain: list[str]


def read_checkpoint(directory: Path) -> SamplerCheckpoint:
    """A chain checkpoint (base, delta, merged base), or plain sampler weights as a base.

    Plain weights are what `save_weights_for_sampler` (tinker's, tether's) writes: full HF weights
    or a PEFT adapter with no chain record. They are complete, so they load as a base whose
    fingerprint is computed here; a delta whose parent holds the very same weights applies on top.
    """
    manifest = read_manifest(directory)
    layout = manifest.get("layout")
    if manifest.get("kind") == HF_WEIGHTS_KIND and isinstance(layout, dict) and "chain" not in layout:
        weights = read_hf_weights(directory, manifest)
        print_ = fingerprint(weights.tensors)
        where = str(directory)
        link = ChainLink(
            checkpoint_type="base",
            identity=where,
            base_identity=where,
            index=0,
            weights_fingerprint=print_,
            base_fingerprint=print_,
            is_lora=weights.lora is not None,
            base_model=weights.base_model,
        )
        return SamplerCheckpoint(link=link, weights=weights)
    return read_sampler_checkpoint_dir(directory)


class ServedWeights:
    """The deployment's current weights, its chain base, hot-loads and request admission."""

    def __init__(
        self,
        backend: ServingBackend,
        *,
        base_model: str,
        state_dir: Path | None,
        transition: Transition = "ASYNC",
    ) -> None:
        if transition not in TRANSITIONS:
            raise UserInputError(f"transition must be SYNC or ASYNC, got {transition!r}", field="transition")
        self.backend = backend
        self.base_model = base_model
        self.transition: Transition = transition
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._cond = threading.Condition()
        self._paused = False
        self._inflight = 0
        self._current = ServedVersion(identity=BASE_IDENTITY, version=None)
        self._held: _Held | None = None
        self._loading = LoadingState()
        self._load_lock = threading.Lock()
        self._numbers = itertools.count(1)
        self.hotloads = 0
        self._history: deque[dict[str, Any]] = deque(maxlen=HISTORY_LIMIT)
        self._recording = True
        """False while `restore` replays the recorded chain (those loads are not new hot-loads)."""

    # ---- requests ----------------------------------------------------------------------------

    def submit(
        self, request: SampleRequest, on_token: TokenCallback | None = None
    ) -> tuple[Future[SampleResult], str]:
        """Queue a request on the current weights (waiting while a SYNC switch is pending).

        Returns the future and the identity of the weights that will serve it. `on_token` sees each
        token as it is generated (on the engine's thread; see `tether.engine.sampling.engine.TokenCallback`).
        """
        futures, identity = self.submit_many([request], [on_token])
        return futures[0], identity

    def submit_many(
        self, requests: list[SampleRequest], on_tokens: list[TokenCallback | None] | None = None
    ) -> tuple[list[Future[SampleResult]], str]:
        """Queue several requests at once, all on the same weights (one identity, even if a hot-load
        switches meanwhile: admission is held until the last is queued), so the engine batches them.

        `on_tokens[i]` (optional) is request i's `on_token`. Returns the futures, in order, and the
        identity. Raises what `backend.submit` raises for any request, having cancelled those
        already queued (nothing is left running)."""
        callbacks = on_tokens if on_tokens is not None else [None] * len(requests)
        if len(callbacks) != len(requests):
            raise ValueError(f"{len(requests)} requests but {len(callbacks)} token callbacks")
        futures: list[Future[SampleResult]] = []
        with self._cond:
            while self._paused:
                self._cond.wait()
            current = self._current
            try:
                for request, on_token in zip(requests, callbacks, strict=True):
                    futures.append(self.backend.submit(request, current.version, on_token))
                    self._inflight += 1
            except BaseException:
                for future in futures:
                    future.cancel()  # nobody will read them
                raise
            finally:
                for future in futures:
                    future.add_done_callback(self._finished)
        return futures, current.identity

    def _finished(self, _: Future) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    # ---- status ------------------------------------------------------------------------------

    @property
    def current(self) -> ServedVersion:
        with self._cond:
            return self._current

    def loading_state(self) -> LoadingState:
        with self._cond:
            return LoadingState(**asdict(self._loading))

    def status(self) -> dict[str, Any]:
        """Fireworks-shaped hot-load status: one replica (this process)."""
        loading = self.loading_state()
        current = self.current
        return {
            "base_model": self.base_model,
            "transition": self.transition,
            "current": current.public(),
            "hot_load_history": self.history(),
            "replicas": [
                {
                    "current_snapshot_identity": current.identity,
                    "readiness": loading.stage != "loading",
                    "loading_state": asdict(loading),
                    "loaded_adapters": [],
                }
            ],
        }

    def history(self) -> list[dict[str, Any]]:
        """Finished hot-loads, oldest first: target identity, stage ("done" | "error"), error, times (s)."""
        with self._cond:
            return list(self._history)

    def _remember(self, finished: LoadingState) -> None:
        entry = asdict(finished)
        with self._cond:
            self._history.append(entry)
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            with open(self.state_dir / _HISTORY_FILE, "a") as handle:
                handle.write(json.dumps(entry) + "\n")

    # ---- hot-load ----------------------------------------------------------------------------

    def start_hotload(
        self, path: str, *, identity: str | None = None, transition: Transition | None = None
    ) -> threading.Thread:
        """Begin loading the checkpoint directory `path` in the background.

        NotFoundError if `path` is not a directory; ConflictError if a hot-load is already running;
        UserInputError for a bad transition.
        Failures of the load itself land in `loading_state()` (stage "error", with the cause).
        """
        if transition is not None and transition not in TRANSITIONS:
            raise UserInputError(f"transition must be SYNC or ASYNC, got {transition!r}", field="transition")
        if not Path(path).is_dir():
            raise NotFoundError(f"no checkpoint directory at {path}")
        if not self._load_lock.acquire(blocking=False):
            raise ConflictError("a hot-load is already in progress; wait for it to finish")
        with self._cond:
            self._loading = LoadingState("loading", identity or str(path), started_at=time.time())
        thread = threading.Thread(
            target=self._hotload_thread, args=(path, identity, transition), name="hotload", daemon=True
        )
        thread.start()
        return thread

    def hotload(
        self, path: str, *, identity: str | None = None, transition: Transition | None = None
    ) -> None:
        """Load synchronously (raises the failure's error; the previous weights keep serving)."""
        self.start_hotload(path, identity=identity, transition=transition).join()
        state = self.loading_state()
        if state.stage == "error":
            raise UserInputError(state.error or "hot-load failed")  # the error names its field already

    def _hotload_thread(self, path: str, identity: str | None, transition: Transition | None) -> None:
        stage, error = "error", "the hot-load stopped unexpectedly"
        error_or_none: str | None
        try:
            self._load(path, identity, transition or self.transition)
            stage = "done"
        except Exception as exc:  # every failure is reported in the status; nothing changes
            if not isinstance(exc, TetherError | DeltaBaseMismatchError | ValueError | OSError):
                log.exception("hot-load of %s failed", path)
            error = exc.message if isinstance(exc, TetherError) else f"{type(exc).__name__}: {exc}"
        finally:
            # history first, then the final stage and a free lock together: whoever sees the load
            # finished can start the next one (no 409 "in progress" after a "done")
            finished = self.loading_state()
            error_or_none = None if stage == "done" else error
            finished.stage, finished.error, finished.finished_at = stage, error_or_none, time.time()
            try:
                if self._recording:
                    self._remember(finished)
            finally:
                with self._cond:
                    self._loading = finished
                    self._load_lock.release()

    def _load(self, path: str, identity: str | None, transition: Transition) -> None:
        directory = Path(path)
        if not directory.is_dir():
            raise UserInputError(f"no checkpoint directory at {path}", field="path")
        checkpoint = read_checkpoint(directory)
        link = checkpoint.link
        if link.base_model and link.base_model != self.base_model:
            raise UserInputError(
                f"checkpoint {link.identity} is for base model {link.base_model!r}; this "
                f"deployment serves {self.base_model!r}",
                field="path",
            )
        held = self._held
        if checkpoint.is_delta:
            if held is None or held.link.weights_fingerprint != link.parent_fingerprint:
                have = held.link.identity if held is not None else "the bare base model"
                raise UserInputError(
                    f"delta {link.identity} applies to {link.parent_identity}, but this "
                    f"deployment serves {have}; hot-load that checkpoint (or a base) first",
                    field="path",
                )
            tensors = checkpoint.rebuild(held.tensors)
            lora = checkpoint.lora
            chain = [*held.chain, str(directory)]
        else:
            assert checkpoint.weights is not None
            tensors = checkpoint.weights.tensors
            lora = checkpoint.weights.lora
            if fingerprint(tensors) != link.weights_fingerprint:
                raise UserInputError(
                    f"checkpoint {link.identity} does not hold the weights its chain record names",
                    field="path",
                )
            chain = [str(directory)]
        version = f"v{next(self._numbers)}"
        self.backend.load(version, tensors, lora)
        served = ServedVersion(
            identity=identity or link.identity,
            version=version,
            checkpoint_type=link.checkpoint_type,
            path=str(directory),
            chain=chain,
            weights_fingerprint=link.weights_fingerprint,
            base_identity=link.base_identity,
        )
        try:
            self._switch(served, transition)
        except BaseException:
            self.backend.unload(version)
            raise
        self._held = _Held(link, tensors, lora, chain)
        self._persist(served)
        self.hotloads += 1

    def _switch(self, served: ServedVersion, transition: Transition) -> None:
        with self._cond:
            if transition == "SYNC":
                self._paused = True
                try:
                    while self._inflight:
                        self._cond.wait()
                finally:
                    self._paused = False
            old, self._current = self._current, served
            if old.version is not None:
                self.backend.unload(old.version)
            self._cond.notify_all()

    # ---- restart -----------------------------------------------------------------------------

    def _persist(self, served: ServedVersion) -> None:
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "identity": served.identity,
            "chain": served.chain,
            "checkpoint_type": served.checkpoint_type,
        }
        tmp = self.state_dir / f".{_STATE_FILE}.tmp"
        tmp.write_text(json.dumps(record))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self.state_dir / _STATE_FILE)

    def restore(self) -> bool:
        """Load the last good weights recorded in the state dir (the base, then each delta in order).

        Returns False when nothing was recorded. Raises if the recorded checkpoints cannot be loaded.
        """
        if self.state_dir is None:
            return False
        history = self.state_dir / _HISTORY_FILE
        if history.is_file():
            with self._cond:
                for line in history.read_text().splitlines()[-HISTORY_LIMIT:]:
                    try:
                        self._history.append(json.loads(line))
                    except ValueError:  # a line cut short by a crash
                        continue
        if not (self.state_dir / _STATE_FILE).is_file():
            return False
        record = json.loads((self.state_dir / _STATE_FILE).read_text())
        *parents, last = record["chain"]
        self._recording = False
        try:
            for path in parents:
                self.hotload(path, transition="ASYNC")
            self.hotload(last, identity=record["identity"], transition="ASYNC")
        finally:
            self._recording = True
        return True
