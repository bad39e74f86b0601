"""The web dashboard every replica serves under ``/ui/``: server-rendered pages
(Jinja2, autoescaped), a stylesheet and a few lines of script shipped inside the
wheel (no CDN, no build step), a token login into a signed session cookie, and
CSRF-protected actions (see session.py)."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from dispatcher.http.dependencies import ApiContext
from dispatcher.http.ui import actions, pages
from dispatcher.http.ui.access import UiContext
from dispatcher.http.ui.rendering import UI_DIR, LoginRequired, UiRefused, redirect, render


def install_dashboard(api: FastAPI, context: ApiContext) -> None:
    """Add the dashboard's routes, assets and error pages to ``api``."""
    api.state.ui = UiContext(context)
    for router in (pages.router, actions.router):
        api.routes.extend(router.routes)
    api.mount("/ui/static", StaticFiles(directory=UI_DIR / "static"), name="ui-static")
    api.add_exception_handler(LoginRequired, _login_required)
    api.add_exception_handler(UiRefused, _refused)


async def _login_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    return redirect(f"/ui/login?next={quote(exc.next_path, safe='')}")


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, UiRefused)
    session = request.app.state.ui.cookies.read(request)
    return render(
        request, "error.html", session, http_status=exc.status, title="Refused", message=exc.message
    )
