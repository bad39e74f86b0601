"""The dashboard's pages: overview, jobs, job detail, types and schedules.

Every page reads the database through the replica's pool, so every replica shows the
same. Counts come from the partial indexes (queue depth) and the queue samples
(charts, last hour), never from a scan of the finished rows.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from dispatcher.core.errors import JobNotFound
from dispatcher.core.records import MAX_TYPE_LENGTH, JobRecord, JobStatus
from dispatcher.http.dependencies import ClientDep, ReplicaDep, SettingsDep
from dispatcher.http.ui import charts
from dispatcher.http.ui.access import UiDep, Viewer, ViewerDep
from dispatcher.http.ui.rendering import render

BIGINT_MAX = 2**63 - 1
PAGE_SIZE = 50
# Dependents listed on a job's page (a fan-out may have thousands).
DEPENDENTS_SHOWN = 50
STATUSES = [s.value for s in JobStatus]

router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)


@router.get("/ui")
async def ui_root() -> Response:
    return RedirectResponse("/ui/", status_code=307)


@dataclass(frozen=True)
class TypeRow:
    """One type on the overview and the types page."""

    type: str
    ready: int
    scheduled: int
    processing: int
    completed_hour: int
    failed_hour: int
    oldest_ready_age: float
    paused: bool
    concurrency: int | None
    rate_limit: str | None
    max_pending: int | None
    accepting: bool
    running_here: int


async def _type_rows(
    replica: ReplicaDep, client: ClientDep, ui: UiDep, alive_within: float
) -> tuple[Any, list[TypeRow]]:
    cluster = await client.cluster_status(alive_within=alive_within)
    finished = await ui.reads().finished_by_type()
    limits = replica.limits()
    running = replica.running_by_type()
    controls = {t.type: t for t in cluster.types}
    names = sorted(set(cluster.queues) | set(finished) | set(controls) | set(limits["types"]))
    rows = []
    for name in names:
        depth = cluster.queues.get(name)
        done = finished.get(name)
        control = controls.get(name)
        rate = limits.get("rates", {}).get(name)
        rows.append(
            TypeRow(
                type=name,
                ready=depth.ready if depth else 0,
                scheduled=depth.scheduled if depth else 0,
                processing=depth.processing if depth else 0,
                completed_hour=done.completed if done else 0,
                failed_hour=done.failed if done else 0,
                oldest_ready_age=depth.oldest_ready_age if depth else 0.0,
                paused=control.paused if control else False,
                concurrency=limits["types"].get(name),
                rate_limit=None if rate is None else f"{rate['starts']} per {rate['per']:g} s",
                max_pending=control.max_pending if control else None,
                accepting=control.accepting if control else True,
                running_here=running.get(name, 0),
            )
        )
    return cluster, rows


@router.get("/ui/")
async def overview(
    request: Request,
    viewer: ViewerDep,
    ui: UiDep,
    replica: ReplicaDep,
    settings: SettingsDep,
    client: ClientDep,
) -> Response:
    cluster, types = await _type_rows(replica, client, ui, settings.alive_within)
    history = await ui.reads().queue_history()
    now = dt.datetime.now(dt.UTC)
    return _page(
        request,
        viewer,
        ui,
        "overview.html",
        title="Overview",
        leader=cluster.leader,
        replicas=cluster.replicas,
        types=types,
        throughput=charts.throughput_chart(history, now),
        depth=charts.depth_chart(history, now),
        this_replica=replica.owner_id,
    )


def _page(
    request: Request,
    viewer: Viewer,
    ui: UiDep,
    template: str,
    *,
    http_status: int = 200,
    **context: Any,
) -> Response:
    return render(
        request,
        template,
        viewer.session,
        http_status=http_status,
        new_session=viewer.new,
        cookies=ui.cookies,
        **context,
    )


def _status_filter(status: str | None) -> str | None:
    return status if status in STATUSES else None


@router.get("/ui/jobs")
async def jobs(
    request: Request,
    viewer: ViewerDep,
    ui: UiDep,
    replica: ReplicaDep,
    client: ClientDep,
    status: Annotated[str | None, Query(max_length=20)] = None,
    type: Annotated[str | None, Query(max_length=MAX_TYPE_LENGTH)] = None,
    q: Annotated[str | None, Query(max_length=1000)] = None,
    before_id: Annotated[int | None, Query(ge=1, le=BIGINT_MAX)] = None,
) -> Response:
    """Jobs newest first: by status, type, and id or unique key (``q``)."""
    status = _status_filter(status)
    type = type.strip() or None if type else None
    q = q.strip() or None if q else None
    found: list[JobRecord]
    if q is not None and q.isdecimal() and len(q) < 19:
        found = [job for job in await _one_job(client, int(q)) if _passes(job, status, type)]
    elif q is not None:
        found = await ui.reads().jobs_by_unique_key(
            q, status=status, type=type, before_id=before_id, limit=PAGE_SIZE
        )
    else:
        found = await client.list_jobs(
            status=status, type=type, before_id=before_id, limit=PAGE_SIZE
        )
    types = sorted(set(replica.limits()["types"]) | {t.type for t in await client.job_types()})
    return _page(
        request,
        viewer,
        ui,
        "jobs.html",
        title="Jobs",
        jobs=found,
        statuses=STATUSES,
        types=types,
        status=status,
        type=type,
        q=q,
        before_id=before_id,
        next_before_id=found[-1].id if len(found) == PAGE_SIZE else None,
    )


async def _one_job(client: ClientDep, job_id: int) -> list[JobRecord]:
    try:
        return [await client.get(job_id)]
    except JobNotFound:
        return []


def _passes(job: JobRecord, status: str | None, type: str | None) -> bool:
    return (status is None or job.status.value == status) and (type is None or job.type == type)


@dataclass(frozen=True)
class TimelineEvent:
    at: dt.datetime
    what: str


def timeline(job: JobRecord) -> list[TimelineEvent]:
    """The job's life in time order: created, each attempt's start and end (earlier
    attempts from its error history), finished."""
    events = [TimelineEvent(job.created_at, "created")]
    last_error_attempt = None
    for error in job.errors:
        attempt = error.get("attempt")
        started = _instant(error.get("started_at"))
        if started is not None:
            events.append(TimelineEvent(started, f"attempt {attempt} started"))
        ended = _instant(error.get("at"))
        if ended is not None:
            events.append(TimelineEvent(ended, f"attempt {attempt} failed: {error.get('error')}"))
        last_error_attempt = (attempt, started is not None)
    if job.started_at is not None and last_error_attempt != (job.attempts, True):
        events.append(TimelineEvent(job.started_at, f"attempt {job.attempts} started"))
    if job.finished_at is not None:
        events.append(TimelineEvent(job.finished_at, job.status.value))
    return sorted(events, key=lambda event: event.at)


def _instant(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        return None


@router.get("/ui/jobs/{job_id}")
async def job_detail(
    request: Request,
    viewer: ViewerDep,
    ui: UiDep,
    client: ClientDep,
    job_id: Annotated[int, Path(ge=1, le=BIGINT_MAX)],
) -> Response:
    try:
        job = await client.get(job_id)
    except JobNotFound:
        return _page(
            request,
            viewer,
            ui,
            "error.html",
            http_status=404,
            title="Not found",
            message=f"no job with id {job_id}",
        )
    links = await ui.reads().job_links(job.id, dependents=DEPENDENTS_SHOWN)
    known = {link.id for link in links.dependencies}
    return _page(
        request,
        viewer,
        ui,
        "job.html",
        title=f"Job {job.id}",
        job=job,
        events=timeline(job),
        progress=_progress(job),
        dependencies=links.dependencies,
        # Dependencies deleted since (after their retention, once this job finished).
        deleted_dependencies=[i for i in job.depends_on or () if i not in known],
        dependents=links.dependents,
        more_dependents=len(links.dependents) >= DEPENDENTS_SHOWN,
    )


@dataclass(frozen=True)
class Progress:
    current: float | None
    total: float | None
    message: str | None

    @property
    def percent(self) -> float | None:
        if self.current is None or not self.total:
            return None
        return max(0.0, min(100.0, 100.0 * self.current / self.total))


def _progress(job: JobRecord) -> Progress | None:
    value = job.progress
    if not isinstance(value, dict):
        return None
    current, total, message = value.get("current"), value.get("total"), value.get("message")
    return Progress(
        current=current if isinstance(current, int | float) else None,
        total=total if isinstance(total, int | float) else None,
        message=message if isinstance(message, str) else None,
    )


@router.get("/ui/types")
async def types_page(
    request: Request,
    viewer: ViewerDep,
    ui: UiDep,
    replica: ReplicaDep,
    settings: SettingsDep,
    client: ClientDep,
) -> Response:
    _, types = await _type_rows(replica, client, ui, settings.alive_within)
    return _page(
        request,
        viewer,
        ui,
        "types.html",
        title="Types",
        types=types,
        global_limit=replica.limits()["global"],
    )


@router.get("/ui/schedules")
async def schedules_page(request: Request, viewer: ViewerDep, ui: UiDep) -> Response:
    # The schedules alone: the cluster status would count the queues too (queue_depth
    # reads every pending and processing index entry), for nothing this page shows.
    return _page(
        request,
        viewer,
        ui,
        "schedules.html",
        title="Schedules",
        schedules=await ui.reads().schedules(),
    )
