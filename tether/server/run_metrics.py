"""Per-run metric series, stored in the catalogue and bounded: what the console draws.

Two sources feed a run's series. The server itself observes every `forward_backward` and
`optim_step` (`observe_forward_backward`, `observe_optim_step`) and records, once per optimizer
step: `loss:sum` (summed over the step's forward_backward calls), `loss:per_token` (that sum over
the step's loss tokens: target positions with a nonzero weight, or all target positions when the
loss takes no weights), `grad_norm` (before clipping), `learning_rate` and `tokens_per_s` (input
tokens over the seconds the engine spent in the step's forward_backward calls). The client adds
whatever it chooses (`log_metrics`, e.g. reward, accuracy, KL, NLL). A series is named
`"<source>/<name>"`: `"server/loss:sum"`, `"client/reward/mean"`.

Bounded: each series keeps at most `max_points_per_series` rows. A row is a bucket of `stride`
consecutive steps holding the mean of its points; when a series would exceed the bound, its stride
doubles and neighbouring buckets merge (so a 100,000-step run keeps its whole curve at a coarser
resolution). At stride 1 a step logged twice keeps the later value (a resumed run re-logs steps).
NaN and infinite values are not stored (JSON cannot carry them).

The table (`run_metric_points`) is created by the catalogue's alembic revision `0003_run_metrics`.
Writes are buffered in memory and flushed in one transaction per second (and before every read),
so recording costs a training step no database write; a crash loses at most the last second.

It refuses to know about HTTP, owners (callers check ownership before asking) and the engine.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Float, Integer, String, delete, func, select
from sqlalchemy.orm import Mapped, mapped_column

from tether.server.catalogue import Base, Catalogue
from tether.types.errors import UserInputError

log = logging.getLogger("tether.server")

SOURCES = ("server", "client")
MAX_NAME_LENGTH = 200
MAX_METRICS_PER_CALL = 1000
FLUSH_INTERVAL_S = 1.0

SeriesKey = tuple[str, str, str]
"""(run_id, source, name)."""


class RunMetricRow(Base):
    """One bucket of one series: steps `[bucket * stride, (bucket + 1) * stride)`."""

    __tablename__ = "run_metric_points"
    run_id: Mapped[str] = mapped_column(String, primary_key=True)
    source: Mapped[str] = mapped_column(String, primary_key=True)
    """server | client."""
    name: Mapped[str] = mapped_column(String, primary_key=True)
    bucket: Mapped[int] = mapped_column(Integer, primary_key=True)
    stride: Mapped[int] = mapped_column(Integer)
    """Steps per bucket; the same for every row of a series (a power of two)."""
    step: Mapped[int] = mapped_column(Integer)
    """The last step seen in the bucket (the x of the plotted point)."""
    value_sum: Mapped[float] = mapped_column(Float)
    count: Mapped[int] = mapped_column(Integer)


@dataclass
class _StepAccumulator:
    """The forward_backward calls of the optimizer step in progress."""

    loss_sum: float = 0.0
    has_loss: bool = False
    tokens: int = 0
    loss_tokens: int = 0
    seconds: float = 0.0


@dataclass
class _Bucket:
    step: int
    value_sum: float
    count: int


@dataclass
class Totals:
    """Server-wide counters of this process (for Prometheus)."""

    optim_steps: int = 0
    forward_backward_calls: int = 0
    tokens: int = 0
    latest: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)
    """run_id -> server series name -> (step, value) of its last record."""


def token_counts(data: Iterable[Any]) -> tuple[int, int]:
    """(input tokens, loss tokens) of a batch of wire or engine datums.

    Loss tokens are target positions with a nonzero weight, or all target positions when the datum
    carries no weights (the RL losses).
    """
    tokens = loss_tokens = 0
    for datum in data:
        inputs = datum.input_tokens() if callable(datum.input_tokens) else datum.input_tokens
        tokens += len(inputs)
        weights = datum.loss_fn_inputs.get("weights")
        targets = datum.loss_fn_inputs.get("target_tokens")
        if weights is not None:
            loss_tokens += int((weights != 0).sum())
        elif targets is not None:
            loss_tokens += len(targets)
    return tokens, loss_tokens


def _check_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite values of `metrics` as floats; UserInputError for a bad name or a non-number."""
    if not isinstance(metrics, Mapping):
        raise UserInputError(f"must map names to numbers, got {type(metrics).__name__}", field="metrics")
    if len(metrics) > MAX_METRICS_PER_CALL:
        raise UserInputError(
            f"at most {MAX_METRICS_PER_CALL} metrics per call, got {len(metrics)}", field="metrics"
        )
    clean: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
            raise UserInputError(
                f"metric names are 1 to {MAX_NAME_LENGTH} characters, got {name!r}"[:300], field="metrics"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserInputError(f"must be a number, got {type(value).__name__}", field=f"metrics.{name}")
        if math.isfinite(value):
            clean[name] = float(value)
    return clean


class RunMetrics:
    """Bounded per-run metric series in the catalogue's database; safe to call from any thread."""

    def __init__(
        self,
        catalogue: Catalogue,
        *,
        max_points_per_series: int = 2000,
        flush_interval_s: float = FLUSH_INTERVAL_S,
    ) -> None:
        if max_points_per_series < 2:
            raise ValueError("max_points_per_series must be at least 2")
        self._catalogue = catalogue
        self.max_points_per_series = max_points_per_series
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending: dict[SeriesKey, list[tuple[int, float]]] = defaultdict(list)
        self._next_step: dict[str, int] = {}
        self._steps_in_flight: dict[str, _StepAccumulator] = {}
        self.totals = Totals()
        self._flush_interval_s = flush_interval_s
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None

    # ---- recording

    def record(self, run_id: str, step: int | None, metrics: Mapping[str, Any], *, source: str) -> None:
        """Add one point per metric at `step` (None: the run's current optimizer step).

        `source` is "server" (observed by the server) or "client" (`log_metrics`). Raises
        UserInputError (field `step`, `metrics` or `metrics.<name>`) and records nothing on bad input.
        """
        if source not in SOURCES:
            raise UserInputError(f"must be one of {SOURCES}, got {source!r}", field="source")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise UserInputError(f"must be a non-negative integer, got {step!r}", field="step")
        clean = _check_metrics(metrics)
        with self._lock:
            at = self._current_step_locked(run_id) if step is None else step
            for name, value in clean.items():
                self._pending[(run_id, source, name)].append((at, value))
            if source == "server":
                latest = self.totals.latest.setdefault(run_id, {})
                latest.update({name: (at, value) for name, value in clean.items()})
        self._ensure_flusher()

    def observe_forward_backward(
        self, run_id: str, data: Sequence[Any], metrics: Mapping[str, Any], *, seconds: float
    ) -> None:
        """Note one forward_backward of the step in progress (recorded at the next optim_step).

        Never raises: observing must not fail the training operation it watches.
        """
        try:
            self._observe_forward_backward(run_id, data, metrics, seconds)
        except Exception:  # noqa: BLE001
            log.exception("observing forward_backward of %s failed", run_id)

    def observe_optim_step(self, run_id: str, metrics: Mapping[str, Any]) -> None:
        """Record the finished optimizer step's server series, then move the run to its next step.

        Never raises: observing must not fail the training operation it watches.
        """
        try:
            self._observe_optim_step(run_id, metrics)
        except Exception:  # noqa: BLE001
            log.exception("observing optim_step of %s failed", run_id)

    def _observe_forward_backward(
        self, run_id: str, data: Sequence[Any], metrics: Mapping[str, Any], seconds: float
    ) -> None:
        tokens, loss_tokens = token_counts(data)
        loss = metrics.get("loss:sum")
        with self._lock:
            acc = self._steps_in_flight.setdefault(run_id, _StepAccumulator())
            if loss is not None:
                acc.loss_sum += float(loss)
                acc.has_loss = True
            acc.tokens += tokens
            acc.loss_tokens += loss_tokens
            acc.seconds += seconds
            self.totals.forward_backward_calls += 1
            self.totals.tokens += tokens

    def _observe_optim_step(self, run_id: str, metrics: Mapping[str, Any]) -> None:
        with self._lock:
            acc = self._steps_in_flight.pop(run_id, _StepAccumulator())
            step = self._current_step_locked(run_id)
            self._next_step[run_id] = step + 1
            self.totals.optim_steps += 1
        values: dict[str, float] = {}
        if acc.has_loss:
            values["loss:sum"] = acc.loss_sum
            if acc.loss_tokens:
                values["loss:per_token"] = acc.loss_sum / acc.loss_tokens
        if acc.tokens and acc.seconds > 0:
            values["tokens_per_s"] = acc.tokens / acc.seconds
        for key, name in (("grad_norm:mean", "grad_norm"), ("learning_rate:mean", "learning_rate")):
            if key in metrics:
                values[name] = float(metrics[key])
        self.record(run_id, step, values, source="server")

    def _current_step_locked(self, run_id: str) -> int:
        """Optimizer steps the server has seen for the run (from the database after a restart)."""
        if run_id not in self._next_step:
            with self._catalogue.reading() as s:
                last = s.scalar(
                    select(func.max(RunMetricRow.step)).where(
                        RunMetricRow.run_id == run_id, RunMetricRow.source == "server"
                    )
                )
            pending = [
                p
                for (r, src, _), points in self._pending.items()
                if r == run_id and src == "server"
                for p, _ in points
            ]
            last = max([last] + pending if last is not None else pending, default=None)
            self._next_step[run_id] = 0 if last is None else last + 1
        return self._next_step[run_id]

    # ---- reading

    def series(self, run_id: str, *, max_points: int | None = None) -> dict[str, list[tuple[int, float]]]:
        """Every series of the run as `{"<source>/<name>": [(step, mean value), ...]}`, steps ascending.

        A series longer than `max_points` (default: the stored bound) is cut into that many groups
        of neighbouring points, each drawn as its count-weighted mean at its last step.
        """
        limit = max_points or self.max_points_per_series
        if limit < 1:
            raise UserInputError(f"must be at least 1, got {limit}", field="max_points")
        self.flush()
        with self._catalogue.reading() as s:
            rows = list(
                s.execute(
                    select(
                        RunMetricRow.source,
                        RunMetricRow.name,
                        RunMetricRow.step,
                        RunMetricRow.value_sum,
                        RunMetricRow.count,
                    )
                    .where(RunMetricRow.run_id == run_id)
                    .order_by(RunMetricRow.source.desc(), RunMetricRow.name, RunMetricRow.bucket)
                )
            )
        grouped: dict[str, list[_Bucket]] = defaultdict(list)
        for source, name, step, value_sum, count in rows:
            grouped[f"{source}/{name}"].append(_Bucket(step, value_sum, count))
        return {key: _downsample(buckets, limit) for key, buckets in grouped.items()}

    def steps(self, run_ids: Sequence[str]) -> dict[str, int]:
        """Optimizer steps the server has observed, per run (0 for a run it has seen none of)."""
        self.flush()
        with self._catalogue.reading() as s:
            rows = s.execute(
                select(RunMetricRow.run_id, func.max(RunMetricRow.step))
                .where(RunMetricRow.run_id.in_(list(run_ids)), RunMetricRow.source == "server")
                .group_by(RunMetricRow.run_id)
            )
            last = {run_id: step for run_id, step in rows}
        return {run_id: last[run_id] + 1 if last.get(run_id) is not None else 0 for run_id in run_ids}

    # ---- storage

    def flush(self) -> None:
        """Write the buffered points (one transaction), merging buckets where a series outgrows its bound."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, defaultdict(list)
            if not pending:
                return
            with self._catalogue.writing() as s:
                for key, points in pending.items():
                    self._write_series(s, key, points)

    def _write_series(self, s: Any, key: SeriesKey, points: list[tuple[int, float]]) -> None:
        run_id, source, name = key
        where = (RunMetricRow.run_id == run_id, RunMetricRow.source == source, RunMetricRow.name == name)
        stored_stride = s.scalar(select(RunMetricRow.stride).where(*where).limit(1))
        stride = stored_stride or 1
        while len({step // stride for step, _ in points}) > self.max_points_per_series:
            stride *= 2  # the batch alone outgrows the bound: coarsen before writing row by row
        if stored_stride is not None and stride > stored_stride:
            self._restride(s, key, where, stride)
        touched: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for step, value in points:
            touched[step // stride].append((step, value))
        existing = {
            row.bucket: row
            for row in s.scalars(select(RunMetricRow).where(*where, RunMetricRow.bucket.in_(list(touched))))
        }
        for bucket, bucket_points in touched.items():
            row = existing.get(bucket)
            if row is None:
                row = RunMetricRow(
                    run_id=run_id,
                    source=source,
                    name=name,
                    bucket=bucket,
                    stride=stride,
                    step=bucket_points[0][0],
                    value_sum=0.0,
                    count=0,
                )
                s.add(row)
            for step, value in bucket_points:
                if stride == 1:  # the same step again (a resumed run): the later value wins
                    row.value_sum, row.count = value, 1
                else:
                    row.value_sum += value
                    row.count += 1
                row.step = max(row.step, step)
        s.flush()
        if (
            s.scalar(select(func.count()).select_from(RunMetricRow).where(*where))
            > self.max_points_per_series
        ):
            self._restride(s, key, where, stride * 2)

    def _restride(self, s: Any, key: SeriesKey, where: tuple, stride: int) -> None:
        """Rewrite the series with buckets of at least `stride` steps (doubling further until it fits)."""
        run_id, source, name = key
        rows = list(s.scalars(select(RunMetricRow).where(*where)))
        if not rows:
            return
        while True:
            buckets: dict[int, _Bucket] = {}
            for row in rows:  # strides are powers of two, so each old bucket falls inside one new bucket
                target = buckets.setdefault(row.bucket * row.stride // stride, _Bucket(row.step, 0.0, 0))
                target.value_sum += row.value_sum
                target.count += row.count
                target.step = max(target.step, row.step)
            if len(buckets) <= self.max_points_per_series:
                break
            stride *= 2
        s.execute(delete(RunMetricRow).where(*where))
        s.add_all(
            RunMetricRow(
                run_id=run_id,
                source=source,
                name=name,
                bucket=bucket,
                stride=stride,
                step=b.step,
                value_sum=b.value_sum,
                count=b.count,
            )
            for bucket, b in buckets.items()
        )
        s.flush()

    # ---- background flushing

    def _ensure_flusher(self) -> None:
        if self._flusher is not None or self._stop.is_set():
            return
        with self._lock:
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_loop, name="tether-run-metrics", daemon=True
                )
                self._flusher.start()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self._flush_interval_s):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - keep flushing; the points stay lost, the server goes on
                log.exception("writing run metrics failed")

    def close(self) -> None:
        """Stop the flusher and write what is buffered."""
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(timeout=10)
        self.flush()


def _downsample(buckets: list[_Bucket], limit: int) -> list[tuple[int, float]]:
    if len(buckets) <= limit:
        return [(b.step, b.value_sum / b.count) for b in buckets]
    size = math.ceil(len(buckets) / limit)
    out = []
    for start in range(0, len(buckets), size):
        group = buckets[start : start + size]
        total = sum(b.count for b in group)
        out.append((group[-1].step, sum(b.value_sum for b in group) / total))
    return out
