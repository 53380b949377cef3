"""Counts of the forward(_backward) passes a training engine ran, and how many ops each carried.

A pass is one run over a set of requests' datums (`TrainingEngine._run_prepared`): a lone
`forward`/`forward_backward` is a pass carrying one op; a fused pass carries several LoRA tenants'
ops at once (`TrainingEngine.forward_backward_fused`). These counts show whether fusion happened.
They are plain integers (`snapshot()` is a JSON-able dict), so they cross process boundaries as
data. Custom-loss passes (`forward_keep_graph`) are not counted. This module knows nothing of
tensors or ops beyond their number.
"""

from __future__ import annotations

import threading


class PassCounts:
    """Thread-safe counters: passes, ops carried, fused passes (>= 2 ops), their ops, the largest pass."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._passes = 0
        self._ops = 0
        self._fused_passes = 0
        self._fused_ops = 0
        self._max_ops = 0

    def record(self, ops_in_pass: int) -> None:
        """Count one pass that carried `ops_in_pass` (>= 1) requests."""
        with self._lock:
            self._passes += 1
            self._ops += ops_in_pass
            if ops_in_pass > 1:
                self._fused_passes += 1
                self._fused_ops += ops_in_pass
            self._max_ops = max(self._max_ops, ops_in_pass)

    def snapshot(self) -> dict[str, int]:
        """`passes`, `ops`, `fused_passes`, `fused_ops`, `max_ops_per_pass`, all counted since start.

        Unfused passes are `passes - fused_passes` (each carried one op)."""
        with self._lock:
            return {
                "passes": self._passes,
                "ops": self._ops,
                "fused_passes": self._fused_passes,
                "fused_ops": self._fused_ops,
                "max_ops_per_pass": self._max_ops,
            }
