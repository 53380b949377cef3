"""The one interface between the server and a trainer: submit an op, get a future of its result.

Two implementations carry the same ops: `InProcessTrainer` (`tether.trainer.local`) and
`RemoteTrainer` (`tether.trainer.remote`, a `tether trainer` process behind a socket).

Ordering: an op with a `stream` (a model id) runs in that stream's `seq_id` order (see
`tether.engine.worker`); an op without one (sampling, sampler registration, `DescribeBase`) runs at
once, beside training. A failed op's future raises a `tether.types.errors.TetherError`; the
trainer stays usable.
"""

from __future__ import annotations

import concurrent.futures
from typing import Protocol

from tether.types.ops import Op


class Trainer(Protocol):
    """One base model's trainer."""

    base_model: str

    def submit(
        self, op: Op, *, stream: str | None = None, seq_id: int | None = None
    ) -> concurrent.futures.Future:
        """Queue `op`; it is queued (in order) when this returns. The future holds an `OpResult`."""
        ...

    def queued(self) -> int:
        """Ops waiting to run (for load reporting)."""
        ...

    def close(self) -> None:
        """Stop: queued ops fail, resources (threads, processes, engines) are released."""
        ...
