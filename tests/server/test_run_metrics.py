"""RunMetrics: series kept per run, bounded by merging neighbouring steps, fed by the server's observations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tether.server.catalogue import Catalogue
from tether.server.run_metrics import RunMetricRow, RunMetrics, token_counts
from tether.types.errors import UserInputError
from tether.types.proto import WireDatum, WireTextChunk


@pytest.fixture
def catalogue(tmp_path):
    catalogue = Catalogue(tmp_path / "tether.db")
    yield catalogue
    catalogue.close()


@pytest.fixture
def metrics(catalogue):
    run_metrics = RunMetrics(catalogue, max_points_per_series=16)
    yield run_metrics
    run_metrics.close()


def stored_rows(catalogue: Catalogue, run_id: str) -> list[RunMetricRow]:
    from sqlalchemy import select

    with catalogue.reading() as s:
        return list(s.scalars(select(RunMetricRow).where(RunMetricRow.run_id == run_id)))


def datum(tokens: int, weights: list[float] | None) -> WireDatum:
    inputs = {"target_tokens": np.arange(tokens, dtype=np.int64)}
    if weights is not None:
        inputs["weights"] = np.asarray(weights, dtype=np.float32)
    return WireDatum(
        model_input_chunks=[WireTextChunk(np.arange(tokens, dtype=np.int32))], loss_fn_inputs=inputs
    )


def test_client_points_come_back_per_series_in_step_order(metrics):
    metrics.record("run-a", 2, {"reward": 0.5, "kl": 0.1}, source="client")
    metrics.record("run-a", 0, {"reward": 0.25}, source="client")
    metrics.record("run-b", 0, {"reward": 9.0}, source="client")
    assert metrics.series("run-a") == {"client/reward": [(0, 0.25), (2, 0.5)], "client/kl": [(2, 0.1)]}
    assert metrics.series("run-b") == {"client/reward": [(0, 9.0)]}
    assert metrics.series("nobody") == {}


def test_a_relogged_step_keeps_the_later_value(metrics):
    metrics.record("run", 5, {"nll": 1.0}, source="client")
    metrics.flush()
    metrics.record("run", 5, {"nll": 2.0}, source="client")
    assert metrics.series("run") == {"client/nll": [(5, 2.0)]}


def test_non_finite_values_are_left_out(metrics):
    metrics.record("run", 0, {"a": math.nan, "b": math.inf, "c": 1.0}, source="client")
    assert metrics.series("run") == {"client/c": [(0, 1.0)]}


@pytest.mark.parametrize(
    ("step", "values", "source", "field"),
    [
        (-1, {"a": 1.0}, "client", "step"),
        (1.5, {"a": 1.0}, "client", "step"),
        (0, {"a": "1.0"}, "client", "metrics.a"),
        (0, {"a": True}, "client", "metrics.a"),
        (0, {"": 1.0}, "client", "metrics"),
        (0, {"a": 1.0}, "browser", "source"),
    ],
)
def test_bad_input_names_the_field_and_records_nothing(metrics, step, values, source, field):
    with pytest.raises(UserInputError) as info:
        metrics.record("run", step, {"ok": 1.0, **values}, source=source)
    assert info.value.field == field
    assert metrics.series("run") == {}


def test_a_long_series_is_bounded_and_keeps_its_mean(catalogue, metrics):
    for start in range(0, 100_000, 5_000):  # flushed chunk by chunk, as a live run would be
        for step in range(start, start + 5_000):
            metrics.record("long", step, {"x": float(step)}, source="client")
        metrics.flush()
    rows = stored_rows(catalogue, "long")
    assert len(rows) <= 16
    assert sum(r.count for r in rows) == 100_000
    assert sum(r.value_sum for r in rows) == pytest.approx(sum(range(100_000)))
    (points,) = metrics.series("long").values()
    assert len(points) <= 16 and points[-1][0] == 99_999
    assert [s for s, _ in points] == sorted(s for s, _ in points)
    assert [v for _, v in points] == sorted(v for _, v in points)  # means of consecutive step ranges
    assert len(metrics.series("long", max_points=5)["client/x"]) <= 5


def test_chunked_and_one_shot_writes_store_the_same_series(tmp_path, metrics):
    for step in range(3_000):
        metrics.record("run", step, {"x": math.sin(step)}, source="client")
        if step % 700 == 0:
            metrics.flush()
    other = Catalogue(tmp_path / "other.db")
    one_shot = RunMetrics(other, max_points_per_series=16)
    for step in range(3_000):
        one_shot.record("run", step, {"x": math.sin(step)}, source="client")
    a, b = metrics.series("run")["client/x"], one_shot.series("run")["client/x"]
    one_shot.close()
    other.close()
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [v for _, v in a] == pytest.approx([v for _, v in b])


def test_read_time_downsampling_averages_neighbours(metrics):
    for step in range(10):
        metrics.record("run", step, {"x": float(step)}, source="client")
    assert metrics.series("run", max_points=4)["client/x"] == [(2, 1.0), (5, 4.0), (8, 7.0), (9, 9.0)]


def test_token_counts_use_nonzero_weights_or_all_targets():
    assert token_counts([datum(4, [0.0, 1.0, 1.0, 0.5]), datum(3, None)]) == (7, 3 + 3)


def test_server_observations_become_one_point_per_optimizer_step(catalogue, metrics):
    for step in range(3):
        # two forward_backward calls (a chunked batch) then the optimizer step
        metrics.observe_forward_backward(
            "run", [datum(4, [1, 1, 0, 0])], {"loss:sum": 2.0 + step}, seconds=0.5
        )
        metrics.observe_forward_backward("run", [datum(6, None)], {"loss:sum": 1.0}, seconds=0.5)
        metrics.observe_optim_step("run", {"grad_norm:mean": 0.1 * step, "learning_rate:mean": 1e-3})
    series = metrics.series("run")
    assert series["server/loss:sum"] == [(0, 3.0), (1, 4.0), (2, 5.0)]
    assert series["server/loss:per_token"] == [(0, 3.0 / 8), (1, 4.0 / 8), (2, 5.0 / 8)]
    assert series["server/tokens_per_s"] == [(s, 10.0) for s in range(3)]
    assert [v for _, v in series["server/grad_norm"]] == pytest.approx([0.0, 0.1, 0.2])
    assert series["server/learning_rate"] == [(s, 1e-3) for s in range(3)]
    assert metrics.steps(["run", "other"]) == {"run": 3, "other": 0}
    # client metrics without a step land on the run's current step
    metrics.record("run", None, {"reward": 1.0}, source="client")
    assert metrics.series("run")["client/reward"] == [(3, 1.0)]

    metrics.close()  # a restarted server counts on from the stored steps
    restarted = RunMetrics(catalogue, max_points_per_series=16)
    restarted.observe_forward_backward("run", [datum(2, None)], {"loss:sum": 7.0}, seconds=1.0)
    restarted.observe_optim_step("run", {})
    assert restarted.series("run")["server/loss:sum"][-1] == (3, 7.0)
    assert restarted.totals.optim_steps == 1
    restarted.close()


def test_observing_never_fails_the_operation_it_watches(metrics):
    metrics.observe_forward_backward("run", [object()], {"loss:sum": 1.0}, seconds=0.1)
    metrics.observe_optim_step("run", {"grad_norm:mean": "not a number"})


def test_the_alembic_migration_creates_the_table_the_model_describes(tmp_path):
    import importlib.util
    from pathlib import Path

    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.operations import Operations
    from sqlalchemy import MetaData, create_engine

    import tether.server

    path = Path(tether.server.__file__).parent / "migrations" / "versions" / "0003_run_metrics.py"
    spec = importlib.util.spec_from_file_location("migration_0003", path)
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    assert (migration.revision, migration.down_revision) == ("0003_run_metrics", "0002_idempotency_keys")
    engine = create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    only_ours = MetaData()
    RunMetricRow.__table__.to_metadata(only_ours)
    with engine.begin() as conn:
        context = MigrationContext.configure(conn)
        with Operations.context(context):
            migration.upgrade()
        assert compare_metadata(context, only_ours) == []
        with Operations.context(context):
            migration.downgrade()
        assert compare_metadata(context, only_ours) != []
    engine.dispose()
