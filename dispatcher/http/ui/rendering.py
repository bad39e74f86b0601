"""Rendering the dashboard's pages: the Jinja2 environment (autoescaped: nothing from a
job row is ever HTML), its filters, the security headers of every page, and the
exceptions that become a login redirect or an error page."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from dispatcher.http.ui.session import SessionCookies, UiSession

UI_DIR = Path(__file__).parent
# Scripts and styles come from /ui/static only; no frames, no other origins.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def relative_time(value: dt.datetime | None, now: dt.datetime) -> str:
    """``value`` from ``now`` in words: "in 5 s", "3 min ago", "2 h ago", "4 d ago"."""
    if value is None:
        return "—"
    seconds = (value - now).total_seconds()
    size = abs(seconds)
    if size < 1:
        return "now"
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if size >= length:
            amount = f"{int(size // length)} {unit}"
            break
    else:
        amount = f"{int(size)} s"
    return f"in {amount}" if seconds > 0 else f"{amount} ago"


def absolute_time(value: dt.datetime | None) -> str:
    return "—" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


templates = Jinja2Templates(directory=UI_DIR / "templates")
templates.env.filters["pretty_json"] = pretty_json
templates.env.filters["duration"] = duration
templates.env.globals["relative_time"] = relative_time
templates.env.globals["absolute_time"] = absolute_time


class LoginRequired(Exception):
    """No valid session: a page redirects to the login page, an action is refused."""

    def __init__(self, next_path: str) -> None:
        self.next_path = next_path


class UiRefused(Exception):
    """A request the dashboard refuses, shown as an error page with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


# What an action did, shown on the page it returns to: ?notice=<code>&n=<count>
# &skipped=<count>. Codes, not text, so a link cannot put words on the page.
NOTICES = {
    "retried": "{n} job(s) back to pending",
    "cancelled": "{n} job(s) cancelled or asked to stop",
    "paused": "type paused: no new job of it starts",
    "resumed": "type resumed",
    "none_selected": "no job selected",
}


def notice_text(request: Request) -> str | None:
    template = NOTICES.get(request.query_params.get("notice", ""))
    if template is None:
        return None
    counts = {}
    for name in ("n", "skipped"):
        raw = request.query_params.get(name, "0")
        counts[name] = int(raw) if raw.isdecimal() and len(raw) < 10 else 0
    text = template.format(**counts)
    if counts["skipped"]:
        text += f"; {counts['skipped']} skipped (not in a state that allows it)"
    return text


def render(
    request: Request,
    template: str,
    session: UiSession | None,
    *,
    http_status: int = 200,
    new_session: bool = False,
    cookies: SessionCookies | None = None,
    **context: Any,
) -> HTMLResponse:
    """``template`` rendered with ``context``, the session, the clock and the notice
    of the last action (``?notice=``)."""
    response = templates.TemplateResponse(
        request,
        template,
        {
            "session": session,
            "now": dt.datetime.now(dt.UTC),
            "notice": notice_text(request),
            **context,
        },
        status_code=http_status,
        headers=SECURITY_HEADERS,
    )
    if new_session and cookies is not None and session is not None:
        cookies.start(response, request, session.role, csrf=session.csrf)
    return response


def redirect(url: str) -> Response:
    """After an action: back to a page (303, so the browser GETs it)."""
    return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)
