"""A training loop that survives its trainer job's crashes and preemptions.

`ReconnectingTrainingClient` binds a training client to a dedicated trainer job. `run(step_fn,
num_steps, save_every)` calls `step_fn(client, step)` for each step, saves the full training state
(weights + optimizer, `save_state`) every `save_every` steps under `<prefix>-step-<NNNNNN>`, and
when a call fails because the job went away it reconnects (`TrainerJobManager.reconnect_and_wait`),
restores the newest of its saves with optimizer state into a fresh training client, and continues
from that save's step. The data position is the step number stored in the checkpoint's name, so
with a `step_fn` whose batch depends only on `step`, no batch is replayed into the weights or
skipped, and the final weights equal an uninterrupted run's.

There is no server-side transparent resume (reference §9): the loop's own saves are the resume
points, and work done after the last save is redone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from tether.client.jobs import TrainerJobManager
from tether.client.service_client import ServiceClient
from tether.client.training_client import TrainingClient
from tether.types.errors import AuthenticationError, ServerError, TetherError, UserInputError
from tether.types.wire_jobs import JobCheckpoint

log = logging.getLogger("tether.client")

_STEP = re.compile(r"-step-(\d+)$")


class ReconnectingTrainingClient:
    """A training client on trainer job `job_id` that reconnects and restores after the job dies."""

    def __init__(
        self,
        manager: TrainerJobManager,
        job_id: str,
        *,
        base_model: str,
        lora_rank: int = 0,
        seed: int | None = 0,
        prefix: str = "resume",
        poll_interval_s: float = 1.0,
        reconnect_timeout_s: float = 600.0,
    ) -> None:
        self.manager = manager
        self.job_id = job_id
        self.base_model = base_model
        self.lora_rank = lora_rank
        self.seed = seed
        self.prefix = prefix
        self.poll_interval_s = poll_interval_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.service: ServiceClient | None = None
        self.client: TrainingClient | None = None
        self.reconnects = 0
        self.restored_from: list[str] = []
        """The tinker paths restored after each reconnect."""

    def checkpoint_name(self, step: int) -> str:
        return f"{self.prefix}-step-{step:06d}"

    def connect(self) -> int:
        """(Re)connect to the job and restore the newest save; returns the step to continue from
        (0 with a fresh model, whose initial state is saved at once as step 0)."""
        if self.service is not None:
            self.service.close("interrupted")
        endpoint = self.manager.reconnect_and_wait(
            self.job_id, poll_interval_s=self.poll_interval_s, timeout_s=self.reconnect_timeout_s
        )
        self.service = ServiceClient(base_url=endpoint.base_url, api_key=self.manager.api_key)
        latest = self.manager.latest_resumable(self.job_id, prefix=self.prefix + "-step-")
        if latest is None:
            self.client = self.service.create_lora_training_client(
                self.base_model, rank=self.lora_rank, seed=self.seed
            ).result()
            self.client.save_state(self.checkpoint_name(0)).result()
            return 0
        self.client = self.service.create_training_client_from_state_with_optimizer(
            latest.tinker_path
        ).result()
        self.restored_from.append(latest.tinker_path)
        return _step_of(latest)

    def run(
        self,
        step_fn: Callable[[TrainingClient, int], None],
        *,
        num_steps: int,
        save_every: int,
        max_reconnects: int = 10,
    ) -> TrainingClient:
        """Run steps `[resume point, num_steps)`; the last step is always saved. Returns the client
        holding the final weights. Raises the last error after `max_reconnects` reconnects, and
        caller errors (UserInputError, AuthenticationError) at once."""
        if save_every < 1:
            raise UserInputError(f"must be >= 1, got {save_every}", field="save_every")
        step = self._connect(max_reconnects, None)
        while step < num_steps:
            try:
                assert self.client is not None
                step_fn(self.client, step)
                step += 1
                if step % save_every == 0 or step == num_steps:
                    self.client.save_state(self.checkpoint_name(step)).result()
            except (UserInputError, AuthenticationError):
                raise
            except (TetherError, OSError) as exc:
                step = self._connect(max_reconnects, (step, exc))
        assert self.client is not None
        return self.client

    def _connect(self, max_reconnects: int, lost: tuple[int, BaseException] | None) -> int:
        """`connect`, again after each failure (a job whose process group is still going down can
        look ready, then fail the restore) until it succeeds or `max_reconnects` are used up."""
        while True:
            if lost is not None:
                step, exc = lost
                if self.reconnects >= max_reconnects:
                    raise exc
                self.reconnects += 1
                log.warning(
                    "trainer job %s lost at step %d (%s); reconnecting (%d/%d)",
                    self.job_id,
                    step,
                    exc,
                    self.reconnects,
                    max_reconnects,
                )
            try:
                return self.connect()
            except (UserInputError, AuthenticationError):
                raise
            except (TetherError, OSError) as exc:
                lost = (-1 if lost is None else lost[0], exc)

    def close(self) -> None:
        if self.service is not None:
            self.service.close()
            self.service = None


def _step_of(checkpoint: JobCheckpoint) -> int:
    match = _STEP.search(checkpoint.tinker_path)
    if match is None:
        raise ServerError(f"checkpoint {checkpoint.tinker_path} has no step in its name")
    return int(match.group(1))
