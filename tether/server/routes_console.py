"""The web console and the run-metrics surface: pages, JSON for them, client-logged metrics, /metrics.

- `GET /console` serves the console (static HTML, CSS and JS in `tether/server/console/`); it signs
  in with an API key kept in the browser session and calls the JSON routes below with it as a bearer.
- `GET /api/v1/tether/runs/{run_id}/metrics`: a run's series, downsampled to `max_points`.
- `POST /api/v1/tether/runs/{run_id}/metrics`: metrics a client logs (`TrainingClient.log_metrics`).
- `GET /api/v1/tether/console/...`: what the pages list (runs, one run, sessions and samplers,
  trainer jobs, deployments), each limited to the caller's key; another key's run answers 404.
- `GET /metrics`: Prometheus text format for operators (scrape with the key as a bearer token):
  this process's server-wide counters (with, per in-process base model, forward(_backward) passes
  and the ops they carried, fused or not), and the latest server-observed metrics of the caller's runs.

Routes that read the database are plain functions (FastAPI runs them in its thread pool, off the
event loop). Checkpoint actions (delete, TTL) use the REST routes the SDKs use (`routes_rest`). It refuses to
know how training runs: it reads the catalogue, the live hosts and `RunMetrics` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from tether.server.catalogue import SessionRow, TrainingRunRow, as_utc
from tether.server.routes_rest import checkpoint_json
from tether.server.state import ServerState, request_owner, server_state
from tether.types import wire
from tether.types.wire_base import MAX_INT64

CONSOLE_DIR = Path(__file__).parent / "console"
DEFAULT_PAGE_POINTS = 1000

router = APIRouter()


def install(app: FastAPI) -> None:
    """Add the console's routes and static files to `app`."""
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=CONSOLE_DIR), name="console-static")


# ---- pages


@router.get("/console", include_in_schema=False)
async def console_page() -> FileResponse:
    return FileResponse(CONSOLE_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/console/", include_in_schema=False)
async def console_slash() -> RedirectResponse:
    return RedirectResponse("/console")


# ---- run metrics


@router.post("/api/v1/tether/runs/{run_id}/metrics")
def log_metrics(
    run_id: str,
    body: wire.LogMetricsRequest,
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, str]:
    state.catalogue.get_training_run(run_id, owner)
    state.run_metrics.record(run_id, body.step, body.metrics, source="client")
    return {"status": "ok"}


@router.get("/api/v1/tether/runs/{run_id}/metrics")
def run_metrics(
    run_id: str,
    max_points: int = Query(DEFAULT_PAGE_POINTS, ge=1, le=100_000),
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, Any]:
    """`{"run_id", "max_points", "series": {"server/loss:sum": [[step, value], ...], ...}}`."""
    state.catalogue.get_training_run(run_id, owner)
    series = state.run_metrics.series(run_id, max_points=max_points)
    return {
        "run_id": run_id,
        "max_points": max_points,
        "series": {name: [[step, value] for step, value in points] for name, points in series.items()},
    }


# ---- what the pages list


def _iso(value: Any) -> str | None:
    return as_utc(value).isoformat() if value is not None else None


def _run_summary(state: ServerState, row: TrainingRunRow, steps: int) -> dict[str, Any]:
    _, checkpoints = state.catalogue.list_checkpoints(row.owner, run_id=row.run_id, limit=1)
    return {
        "run_id": row.run_id,
        "session_id": row.session_id,
        "base_model": row.base_model,
        "is_lora": row.is_lora,
        "lora_rank": row.lora_rank,
        "created": _iso(row.created_at),
        "last_activity": _iso(row.last_request_time),
        "steps": steps,
        "checkpoints": checkpoints,
        "live": state.live.has_model(row.run_id),
        "user_metadata": {str(k): str(v) for k, v in (row.user_metadata or {}).items()},
    }


@router.get("/api/v1/tether/console/whoami")
def whoami(state: ServerState = Depends(server_state), owner: str = Depends(request_owner)) -> dict[str, Any]:
    """Answers 200 for a key the server accepts (the console's sign-in check)."""
    return {"owner": owner, "single_user": not state.config.api_keys}


@router.get("/api/v1/tether/console/runs")
def console_runs(
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_INT64),
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, Any]:
    rows, total = state.catalogue.list_training_runs(owner, limit, offset)
    steps = state.run_metrics.steps([r.run_id for r in rows])
    return {
        "runs": [_run_summary(state, r, steps[r.run_id]) for r in rows],
        "total": total,
        "offset": offset,
        "limit": limit,
    }


@router.get("/api/v1/tether/console/runs/{run_id}")
def console_run(
    run_id: str, state: ServerState = Depends(server_state), owner: str = Depends(request_owner)
) -> dict[str, Any]:
    row = state.catalogue.get_training_run(run_id, owner)
    checkpoints, _ = state.catalogue.list_checkpoints(owner, run_id=run_id)
    summary = _run_summary(state, row, state.run_metrics.steps([run_id])[run_id])
    return {
        **summary,
        "lora_config": row.lora_config or {},
        "checkpoint_list": [checkpoint_json(c) for c in checkpoints],
    }


def _session_json(state: ServerState, owner: str, row: SessionRow) -> dict[str, Any]:
    samplers = []
    for sampler_id in state.catalogue.samplers_of_session(row.session_id):
        sampler = state.catalogue.get_sampler(sampler_id, owner)
        samplers.append(
            {
                "sampler_id": sampler_id,
                "base_model": sampler.base_model,
                "model_path": sampler.model_path,
                "created": _iso(sampler.created_at),
                "live": state.live.has_sampler(sampler_id),
            }
        )
    return {
        "session_id": row.session_id,
        "status": row.status,
        "created": _iso(row.created_at),
        "last_heartbeat": _iso(row.last_heartbeat),
        "display_name": row.display_name,
        "tags": list(row.tags or []),
        "training_run_ids": state.catalogue.runs_of_session(row.session_id),
        "samplers": samplers,
    }


@router.get("/api/v1/tether/console/sessions")
def console_sessions(
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_INT64),
    state: ServerState = Depends(server_state),
    owner: str = Depends(request_owner),
) -> dict[str, Any]:
    rows = state.catalogue.list_sessions(owner, limit, offset)
    return {"sessions": [_session_json(state, owner, r) for r in rows], "offset": offset, "limit": limit}


@router.get("/api/v1/tether/console/jobs")
async def console_jobs(request: Request, owner: str = Depends(request_owner)) -> dict[str, Any]:
    """The caller's trainer jobs (tether/jobs), newest first."""
    import asyncio

    from tether.server.routes_jobs import job_manager

    rows = await asyncio.to_thread(job_manager(request.app).list, owner)
    jobs = [
        {
            "job_id": r.job_id,
            "state": r.job_state.short,
            "base_model": r.job_config.base_model,
            "reason": r.reason,
            "restarts": r.restart_count,
            "created": as_utc(r.created_at),
        }
        for r in rows
    ]
    return {
        "jobs": jobs,
        "available": True,
        "note": "Create one with `tether jobs create --base-model ...` or TrainerJobManager.create_and_wait.",
    }


@router.get("/api/v1/tether/console/deployments")
async def console_deployments(
    request: Request, state: ServerState = Depends(server_state), owner: str = Depends(request_owner)
) -> dict[str, Any]:
    """The caller's deployments: state, health, the weights they serve and their last hot-load."""
    import asyncio

    import httpx

    from tether.server.routes_deployments import registry

    reg = registry(request, state)
    rows = await asyncio.to_thread(reg.list, owner)
    deployments = []
    async with httpx.AsyncClient(timeout=2.0) as client:
        for row in rows:
            status: dict[str, Any] = {}
            if row.state == "READY":
                try:
                    url = await asyncio.to_thread(reg.url, row.deployment_id, owner)
                    status = (await client.get(f"{url}/status")).json()
                except Exception:  # noqa: BLE001 - an unreachable process shows as unhealthy
                    status = {}
            replica = (status.get("replicas") or [{}])[0]
            loading = replica.get("loading_state") or {}
            deployments.append(
                {
                    "deployment_id": row.deployment_id,
                    "state": row.state,
                    "healthy": bool(status),
                    "base_model": row.base_model,
                    "transition": row.transition,
                    "serving": replica.get("current_snapshot_identity"),
                    "last_hot_load": loading.get("stage"),
                    "hot_load_history": [
                        f"{h.get('target_snapshot_identity')}: {h.get('stage')}"
                        + (f" ({h['error']})" if h.get("error") else "")
                        for h in status.get("hot_load_history", [])[-20:]
                    ],
                    "hot_load_error": loading.get("error") or row.error,
                    "created": as_utc(row.created_at),
                }
            )
    return {
        "deployments": deployments,
        "available": True,
        "note": "Create one with `tether deployments create` or DeploymentManager.create_or_get.",
    }


# ---- Prometheus

_RUN_GAUGES = {
    "loss:sum": ("tether_run_loss_sum", "Training loss summed over the last optimizer step's tokens."),
    "loss:per_token": (
        "tether_run_loss_per_token",
        "Training loss per loss token in the last optimizer step.",
    ),
    "grad_norm": ("tether_run_grad_norm", "Gradient norm (before clipping) of the last optimizer step."),
    "learning_rate": ("tether_run_learning_rate", "Learning rate of the last optimizer step."),
    "tokens_per_s": (
        "tether_run_tokens_per_second",
        "Input tokens per second of forward_backward compute in the last optimizer step.",
    ),
}


class _Collector:
    """One scrape's worth of metrics for one owner (prometheus_client's custom-collector protocol)."""

    def __init__(self, state: ServerState, owner: str) -> None:
        self.state = state
        self.owner = owner

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        totals = self.state.run_metrics.totals
        yield CounterMetricFamily(
            "tether_optim_steps", "Optimizer steps this server process ran.", value=totals.optim_steps
        )
        yield CounterMetricFamily(
            "tether_forward_backward_calls",
            "forward_backward calls this server process ran.",
            value=totals.forward_backward_calls,
        )
        yield CounterMetricFamily(
            "tether_trained_tokens",
            "Input tokens of this process's forward_backward calls.",
            value=totals.tokens,
        )
        yield from _pass_metrics(self.state)
        catalogue = self.state.catalogue
        sessions = catalogue.list_sessions(self.owner, 10**9, 0)
        active = GaugeMetricFamily("tether_sessions", "Sessions of this key, by status.", labels=["status"])
        for status in ("active", "finished", "expired"):
            active.add_metric([status], sum(1 for s in sessions if s.status == status))
        yield active
        runs, total_runs = catalogue.list_training_runs(self.owner, 10**9, 0)
        yield GaugeMetricFamily("tether_training_runs", "Training runs of this key.", value=total_runs)
        checkpoints, total_checkpoints = catalogue.list_checkpoints(self.owner, limit=10**9)
        yield GaugeMetricFamily("tether_checkpoints", "Checkpoints of this key.", value=total_checkpoints)
        yield GaugeMetricFamily(
            "tether_checkpoint_bytes",
            "Bytes of this key's checkpoints.",
            value=sum(c.size_bytes or 0 for c in checkpoints),
        )
        mine = {r.run_id for r in runs}
        latest = {run_id: dict(values) for run_id, values in list(totals.latest.items()) if run_id in mine}
        step = GaugeMetricFamily(
            "tether_run_step", "Last optimizer step the server observed.", labels=["run_id"]
        )
        gauges = {
            name: GaugeMetricFamily(metric, doc, labels=["run_id"])
            for name, (metric, doc) in _RUN_GAUGES.items()
        }
        for run_id, values in sorted(latest.items()):
            step.add_metric([run_id], max(s for s, _ in values.values()))
            for name, (_, value) in values.items():
                if name in gauges:
                    gauges[name].add_metric([run_id], value)
        yield step
        yield from gauges.values()


def _pass_metrics(state: ServerState) -> Any:
    """Per loaded base model: forward(_backward) passes and the ops they carried, fused (>= 2 ops,
    several LoRA tenants in one pass) or not. Only in-process trainers report them (a
    `--trainer-process` trainer has no stats channel yet, so its base model is absent)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    passes = CounterMetricFamily(
        "tether_training_passes",
        "Forward(_backward) passes this server's trainers ran; fused=true: one pass carried several "
        "LoRA models' ops.",
        labels=["base_model", "fused"],
    )
    carried = CounterMetricFamily(
        "tether_training_pass_ops",
        "forward/forward_backward ops those passes carried.",
        labels=["base_model", "fused"],
    )
    largest = GaugeMetricFamily(
        "tether_training_max_ops_per_pass", "Most ops one pass carried.", labels=["base_model"]
    )
    for trainer in state.trainers.loaded():
        stats = getattr(trainer, "pass_stats", None)
        if stats is None:
            continue
        counts = stats()
        name = trainer.base_model
        passes.add_metric([name, "true"], counts["fused_passes"])
        passes.add_metric([name, "false"], counts["passes"] - counts["fused_passes"])
        carried.add_metric([name, "true"], counts["fused_ops"])
        carried.add_metric([name, "false"], counts["ops"] - counts["fused_ops"])
        largest.add_metric([name], counts["max_ops_per_pass"])
    yield from (passes, carried, largest)


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics(
    state: ServerState = Depends(server_state), owner: str = Depends(request_owner)
) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(state, owner))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
