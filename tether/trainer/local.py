"""`InProcessTrainer`: one base model's `OpExecutor` behind an ordered worker, in this process.

Ops with a stream (a model id) go through the `ModelWorker` in `seq_id` order, one at a time except
that LoRA models' forward/forward_backward ops ready together run as one fused pass
(`OpExecutor.fusible` / `execute_batch`, unless `EngineSettings.fuse_lora_ops` is off);
`Sample` goes straight to the sampling engine (which batches concurrent requests), and the other
unordered ops (sampler registration, `DescribeBase`) run on a small pool, so sampling never waits
behind training.
"""

from __future__ import annotations

import concurrent.futures
import time

from tether.engine.worker import ModelWorker
from tether.trainer.config import EngineSettings
from tether.trainer.executor import OpExecutor
from tether.types import ops


class InProcessTrainer:
    """The `Trainer` interface (`tether.trainer.interface`) in this process."""

    def __init__(self, base_model: str, settings: EngineSettings) -> None:
        self.base_model = base_model
        self.executor = OpExecutor(base_model, settings)
        fuse = settings.fuse_lora_ops
        self.worker = ModelWorker(
            base_model,
            self.executor.execute,
            housekeeping=self.executor.housekeeping,
            fusible=self.executor.fusible if fuse else None,
            execute_batch=self.executor.execute_batch if fuse else None,
            fuse_wait_s=settings.fuse_wait_ms / 1000,
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix=f"tether-trainer-{base_model}"
        )

    def submit(
        self, op: ops.Op, *, stream: str | None = None, seq_id: int | None = None
    ) -> concurrent.futures.Future:
        if stream is not None:
            future = self.worker.submit(stream, seq_id, op)
            # Let the worker take the GIL and start now, not when this thread (the server's event
            # loop) next blocks, after answering the request: ~1 ms off every op's start
            # (bench/service_profile.py, segment A').
            time.sleep(0)
            if isinstance(op, ops.DeleteModel):  # the model is gone: so is its ordering state
                future.add_done_callback(lambda _: self.worker.forget(stream))
            return future
        if isinstance(op, ops.Sample):
            if (
                not self.executor.sampling_ready
            ):  # the first sample builds the engine: not on the caller's thread
                return _flatten(self._pool.submit(self.executor.sample, op))
            try:
                return self.executor.sample(op)
            except BaseException as exc:  # noqa: BLE001 - a refused request fails its own future
                failed: concurrent.futures.Future = concurrent.futures.Future()
                failed.set_exception(exc)
                return failed
        return self._pool.submit(self.executor.execute, op)

    def queued(self) -> int:
        return self.worker.queued()

    def pass_stats(self) -> dict[str, int]:
        """Forward(_backward) passes run and the ops they carried (`OpExecutor.pass_stats`): plain ints."""
        return self.executor.pass_stats()

    def close(self) -> None:
        self.worker.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.executor.close()


def _flatten(outer: concurrent.futures.Future) -> concurrent.futures.Future:
    """A future of the result of the future that `outer` resolves to; cancelling it cancels both."""
    answer: concurrent.futures.Future = concurrent.futures.Future()

    def settle(source: concurrent.futures.Future, then=None) -> None:
        try:
            if source.cancelled():
                answer.cancel()
            elif (exc := source.exception()) is not None:
                answer.set_exception(exc)
            elif then is not None:
                then(source.result())
            else:
                answer.set_result(source.result())
        except concurrent.futures.InvalidStateError:  # the answer was cancelled meanwhile
            pass

    def inner_arrived(inner: concurrent.futures.Future) -> None:
        answer.add_done_callback(lambda a: a.cancelled() and inner.cancel())
        inner.add_done_callback(settle)

    outer.add_done_callback(lambda done: settle(done, inner_arrived))
    answer.add_done_callback(lambda a: a.cancelled() and outer.cancel())
    return answer
