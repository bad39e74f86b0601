"""The dashboard's actions: retry and cancel (one job, the selected ones, every failed
job of a type), pause and resume a type, and logging in and out.

Every action is a POST carrying the session's CSRF token (``OperatorDep``) and
answers with a redirect back to a page (303), which says what was done.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Form, Path, Request
from fastapi.responses import HTMLResponse, Response

from dispatcher.core.errors import DispatcherError
from dispatcher.core.records import MAX_TYPE_LENGTH
from dispatcher.http.dependencies import ClientDep
from dispatcher.http.ui.access import DISABLED, OperatorDep, UiDep
from dispatcher.http.ui.pages import BIGINT_MAX, PAGE_SIZE
from dispatcher.http.ui.rendering import UiRefused, redirect, render
from dispatcher.http.ui.session import csrf_matches

router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)

JobId = Annotated[int, Path(ge=1, le=BIGINT_MAX)]
# In the form, not the path: a type name may hold any character, "/" included.
TypeField = Annotated[str, Form(min_length=1, max_length=MAX_TYPE_LENGTH)]


def _back(page: str, notice: str, n: int = 0, skipped: int = 0) -> Response:
    """Back to ``page`` (its filters kept) saying what was done."""
    path, _, query = page.partition("?")
    kept = [(k, v) for k, v in parse_qsl(query) if k not in ("notice", "n", "skipped")]
    said = [("notice", notice), ("n", str(n)), ("skipped", str(skipped))]
    return redirect(f"{path}?{urlencode(kept + said)}")


def _safe_next(value: str | None) -> str:
    """Where to go after logging in: a dashboard path only (no other site)."""
    if value and value.startswith("/ui/") and "//" not in value and "\\" not in value:
        return value
    return "/ui/"


@router.get("/ui/login")
async def login_page(request: Request, ui: UiDep, next: str | None = None) -> Response:
    if ui.cookies.open_access:
        return redirect("/ui/")
    if not ui.cookies.login_possible:
        raise UiRefused(403, DISABLED)
    return render(request, "login.html", None, title="Log in", next=_safe_next(next))


@router.post("/ui/login")
async def log_in(
    request: Request,
    ui: UiDep,
    token: Annotated[str, Form(max_length=4096)] = "",
    next: Annotated[str | None, Form(max_length=2000)] = None,
) -> Response:
    if not ui.cookies.login_possible:
        raise UiRefused(403, DISABLED)
    role = ui.cookies.role_of_token(token)
    if role is None:
        return render(
            request,
            "login.html",
            None,
            http_status=401,
            title="Log in",
            next=_safe_next(next),
            error="wrong token: use DISPATCHER_API_TOKEN, or DISPATCHER_UI_READONLY_TOKEN "
            "to look without acting",
        )
    response = redirect(_safe_next(next))
    ui.cookies.start(response, request, role)
    return response


@router.post("/ui/logout")
async def log_out(request: Request, ui: UiDep) -> Response:
    # Read-only sessions may log out too: check the CSRF token without requiring
    # an acting session.
    form = await request.form()
    session = ui.cookies.read(request)
    token = form.get("csrf_token")
    if session is not None and not csrf_matches(session, token if isinstance(token, str) else None):
        raise UiRefused(403, "missing or wrong CSRF token: reload the page and log out again")
    response = redirect("/ui/login")
    ui.cookies.end(response)
    return response


@router.post("/ui/jobs/{job_id}/retry")
async def retry_job(job_id: JobId, session: OperatorDep, client: ClientDep) -> Response:
    try:
        await client.retry(job_id)
    except DispatcherError:  # not found, or not failed nor cancelled
        return _back(f"/ui/jobs/{job_id}", "retried", 0, skipped=1)
    return _back(f"/ui/jobs/{job_id}", "retried", 1)


@router.post("/ui/jobs/{job_id}/cancel")
async def cancel_job(job_id: JobId, session: OperatorDep, client: ClientDep) -> Response:
    try:
        await client.cancel(job_id)
    except DispatcherError:  # not found, or already finished
        return _back(f"/ui/jobs/{job_id}", "cancelled", 0, skipped=1)
    return _back(f"/ui/jobs/{job_id}", "cancelled", 1)


@router.post("/ui/jobs/selected")
async def act_on_selected(
    session: OperatorDep,
    client: ClientDep,
    action: Annotated[str, Form(pattern="^(retry|cancel)$")],
    ids: Annotated[list[int] | None, Form(max_length=PAGE_SIZE)] = None,
    back: Annotated[str | None, Form(max_length=2000)] = None,
) -> Response:
    """Retry or cancel the jobs ticked on the jobs page."""
    page = _safe_next(back)
    if not ids:
        return _back(page, "none_selected")
    done = skipped = 0
    for job_id in dict.fromkeys(ids):
        if not 1 <= job_id <= BIGINT_MAX:
            skipped += 1
            continue
        try:
            if action == "retry":
                await client.retry(job_id)
            else:
                await client.cancel(job_id)
            done += 1
        except DispatcherError:
            skipped += 1
    return _back(page, "retried" if action == "retry" else "cancelled", done, skipped)


@router.post("/ui/jobs/retry-failed")
async def retry_all_failed(
    session: OperatorDep,
    client: ClientDep,
    type: Annotated[str | None, Form(max_length=MAX_TYPE_LENGTH)] = None,
) -> Response:
    """Every failed job (of ``type``, if given) back to pending."""
    retried = await client.retry_many(status="failed", type=type or None)
    return _back("/ui/jobs", "retried", retried)


@router.post("/ui/types/pause")
async def pause_type(type: TypeField, session: OperatorDep, client: ClientDep) -> Response:
    await client.pause(type)
    return _back("/ui/types", "paused")


@router.post("/ui/types/resume")
async def resume_type(type: TypeField, session: OperatorDep, client: ClientDep) -> Response:
    await client.resume(type)
    return _back("/ui/types", "resumed")
