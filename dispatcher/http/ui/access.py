"""Who may see and do what on the dashboard, as FastAPI dependencies: ``ViewerDep``
for pages (a session, or a redirect to the login page) and ``OperatorDep`` for
actions (a session that may act, and the form's CSRF token matching it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Form, Request

from dispatcher.http.dependencies import ApiContext
from dispatcher.http.ui.reads import DashboardReads
from dispatcher.http.ui.rendering import LoginRequired, UiRefused
from dispatcher.http.ui.session import SessionCookies, UiSession, csrf_matches, new_csrf_token

DISABLED = (
    "the dashboard is disabled: no DISPATCHER_API_TOKEN (nor DISPATCHER_UI_READONLY_TOKEN) "
    "is configured; set one, or start with --insecure-no-auth for local development"
)


class UiContext:
    """What the dashboard shares across requests: the API's context, the session
    cookies, and its own reads (built at the first request, when the pool is open)."""

    def __init__(self, api: ApiContext) -> None:
        self.api = api
        self.cookies = SessionCookies(api.settings, insecure_no_auth=api.insecure_no_auth)
        self._reads: DashboardReads | None = None

    def reads(self) -> DashboardReads:
        if self._reads is None:
            self._reads = DashboardReads(self.api.replica.pool, self.api.settings.schema)
        return self._reads


def ui_context(request: Request) -> UiContext:
    context: UiContext = request.app.state.ui
    return context


UiDep = Annotated[UiContext, Depends(ui_context)]


@dataclass(frozen=True)
class Viewer:
    """A page's visitor: their session, and whether its cookie is still to be set
    (with --insecure-no-auth, a first visit gets one without logging in)."""

    session: UiSession
    new: bool


def viewer(request: Request, ui: UiDep) -> Viewer:
    session = ui.cookies.read(request)
    if session is not None:
        return Viewer(session, new=False)
    if ui.cookies.open_access:
        return Viewer(UiSession("operator", new_csrf_token()), new=True)
    if not ui.cookies.login_possible:
        raise UiRefused(403, DISABLED)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    raise LoginRequired(target)


def operator(
    request: Request, ui: UiDep, csrf_token: Annotated[str | None, Form()] = None
) -> UiSession:
    """The session behind an action: 401 without one, 403 with a missing or wrong
    CSRF token or a read-only session."""
    session = ui.cookies.read(request)
    if session is None:
        if not ui.cookies.login_possible and not ui.cookies.open_access:
            raise UiRefused(403, DISABLED)
        raise UiRefused(401, "not logged in, or the session expired: log in again")
    if not csrf_matches(session, csrf_token):
        raise UiRefused(
            403, "missing or wrong CSRF token: reload the page and submit the form again"
        )
    if not session.can_act:
        raise UiRefused(403, "this session is read-only: log in with the API token to act")
    return session


ViewerDep = Annotated[Viewer, Depends(viewer)]
OperatorDep = Annotated[UiSession, Depends(operator)]
