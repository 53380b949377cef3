"""The trainers of the served base models: one each, in this process or in a `tether trainer` process.

`ServerConfig.trainer_process` chooses the implementation; both carry the same ops
(`tether.trainer.interface`). A trainer is started on first use (loading a base model takes
seconds), and what it reports about its base model (`DescribeBase`) is cached.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from tether.server.config import ServerConfig
from tether.trainer.config import TrainerConfig
from tether.trainer.interface import Trainer
from tether.types import ops
from tether.types.errors import ConfigurationError, UserInputError


class TrainerPool:
    """`get(base_model)` -> its trainer; thread-safe."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._starting: dict[str, threading.Lock] = {}
        self._trainers: dict[str, Trainer] = {}
        self._info: dict[str, ops.BaseModelInfo] = {}
        self.warm = threading.Event()
        """Set once `warm_up` has tried every served model."""
        self.warm_errors: dict[str, str] = {}
        self._on_warm: list[Callable[[], None]] = []

    @property
    def served_names(self) -> list[str]:
        return list(self._config.models)

    def check_served(self, name: str, *, field_name: str = "base_model") -> str:
        """`name` if this server serves it, else `UserInputError` naming `field_name`."""
        if name not in self._config.models:
            raise UserInputError(
                f"model {name!r} is not served here (served: {self._config.models})", field=field_name
            )
        return name

    def started(self, name: str) -> Trainer | None:
        """The trainer of `name` if it is running (never starts one)."""
        with self._lock:
            return self._trainers.get(name)

    def get(self, name: str, *, field_name: str = "base_model") -> Trainer:
        """The trainer serving `name`, started on first use (blocking: call off the event loop)."""
        self.check_served(name, field_name=field_name)
        with self._lock:
            trainer = self._trainers.get(name)
            if trainer is not None:
                return trainer
            starting = self._starting.setdefault(name, threading.Lock())
        with starting:
            with self._lock:
                trainer = self._trainers.get(name)
            if trainer is None:
                trainer = self._start(name)
                with self._lock:
                    self._trainers[name] = trainer
            return trainer

    def _start(self, name: str) -> Trainer:
        settings = self._config.engine_settings()
        address = self._config.trainer_addresses.get(name)
        if address is not None:  # distributed hook: a trainer started elsewhere (e.g. torchrun over nodes)
            from tether.trainer.remote import RemoteTrainer

            host, _, port = address.rpartition(":")
            return RemoteTrainer(name, (host, int(port)))
        if self._config.trainer_process:
            from tether.trainer.remote import RemoteTrainer

            return RemoteTrainer.spawn(
                TrainerConfig(base_model=name, log_level=self._config.log_level, **settings.model_dump())
            )
        if settings.nproc_per_node > 1:  # distributed hook: many ranks live in their own processes
            raise ConfigurationError(
                "nproc_per_node > 1 needs trainer_process (--trainer-process)", field="nproc_per_node"
            )
        from tether.trainer.local import InProcessTrainer  # needs torch: only when a model is first used

        return InProcessTrainer(name, settings)

    def adopt(self, name: str, trainer: Trainer) -> None:
        """Serve `name` with a trainer made elsewhere in this process (rank 0 of a multi-rank trainer
        job, tether/jobs/runner.py); call before the server starts."""
        self.check_served(name)
        with self._lock:
            self._trainers[name] = trainer

    def cached_base_info(self, name: str) -> ops.BaseModelInfo | None:
        with self._lock:
            return self._info.get(name)

    def base_info(self, name: str) -> ops.BaseModelInfo:
        """What the trainer of `name` reports about its base model (blocking; cached)."""
        with self._lock:
            info = self._info.get(name)
        if info is None:
            info = self.get(name).submit(ops.DescribeBase()).result()
            with self._lock:
                self._info[name] = info
        return info

    def warm_up(self) -> None:
        """Start every served model's trainer and load its base model (blocking; the server runs this on
        a background thread at start-up, so the first client's create is as fast as later ones).

        A model that fails to load is recorded in `warm_errors` and retried on first use."""
        for name in self._config.models:
            try:
                self.base_info(name)
            except Exception as exc:  # noqa: BLE001 - reported by readiness, retried on first use
                with self._lock:
                    self.warm_errors[name] = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.warm.set()
            waiting, self._on_warm = self._on_warm, []
        for wake in waiting:
            wake()

    async def until_warm(self) -> None:
        """Return once `warm_up` has tried every served model. The event loop is not woken before
        (no polling): each wake-up while a model loads makes the loading thread hand over the GIL,
        which on a busy machine waits for the scheduler."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def resolve() -> None:
            if not done.done():  # not cancelled
                done.set_result(None)

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(resolve)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                pass

        with self._lock:
            if self.warm.is_set():
                return
            self._on_warm.append(wake)
        await done

    def readiness(self) -> dict[str, str]:
        """Per served model: "ready", "loading" or the error that stopped it from loading."""
        with self._lock:
            answer = {}
            for name in self._config.models:
                if name in self._info:
                    answer[name] = "ready"
                elif name in self.warm_errors:
                    answer[name] = f"failed: {self.warm_errors[name]}"
                else:
                    answer[name] = "loading"
            return answer

    def loaded(self) -> list[Trainer]:
        with self._lock:
            return list(self._trainers.values())

    def close(self) -> None:
        for trainer in self.loaded():
            trainer.close()
