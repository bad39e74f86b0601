"""The dashboard's login session: a signed, expiring, HttpOnly, ``SameSite=Strict``
cookie, and the CSRF token every action must carry.

Logging in with ``DISPATCHER_API_TOKEN`` gives a session that may act (retry, cancel,
pause); with ``DISPATCHER_UI_READONLY_TOKEN``, one that sees everything and may act on
nothing. The cookie holds only the session's role and its CSRF token, signed with
itsdangerous under a key derived from both tokens: every replica with the same tokens
accepts it (so a load balancer may send each request anywhere), and changing a token
ends every session made with the old one. A session lasts ``SESSION_SECONDS``; logging
out drops the cookie.

CSRF: each form carries the session's random token in a hidden field, compared in
constant time with the cookie's (the cookie is ``SameSite=Strict`` as well, so another
site's form arrives without it).

With no token configured the dashboard refuses every page, as the API does, unless the
replica runs with ``--insecure-no-auth``: then every visitor gets an acting session
without logging in, signed with a key of this process.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

from fastapi import Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from dispatcher.core.config import Settings

SESSION_SECONDS = 8 * 3600
Role = Literal["operator", "readonly"]


@dataclass(frozen=True)
class UiSession:
    """A logged-in visitor: whether they may act, and their CSRF token."""

    role: Role
    csrf: str

    @property
    def can_act(self) -> bool:
        return self.role == "operator"


class SessionCookies:
    """Issues and reads one replica's dashboard sessions."""

    def __init__(self, settings: Settings, *, insecure_no_auth: bool) -> None:
        self._operator_token = settings.api_token
        self._readonly_token = settings.ui_readonly_token
        self.open_access = insecure_no_auth and not self.login_possible
        if self.login_possible:
            key = hmac.new(
                f"{self._operator_token or ''}\0{self._readonly_token or ''}".encode(),
                b"dispatcher ui session",
                hashlib.sha256,
            ).hexdigest()
        else:
            key = secrets.token_hex(32)
        self._serializer = URLSafeTimedSerializer(key, salt="dispatcher-ui-session")
        # Per port: in development several replicas share a host name (cookies ignore
        # ports), and with --insecure-no-auth each signs with a key of its own.
        self.cookie_name = f"dispatcher_ui_{settings.http_port}"

    @property
    def login_possible(self) -> bool:
        return self._operator_token is not None or self._readonly_token is not None

    def role_of_token(self, token: str) -> Role | None:
        """The role a login with ``token`` gets (None: a wrong token), compared in
        constant time against both tokens."""
        given = token.encode()
        operator = self._matches(given, self._operator_token)
        readonly = self._matches(given, self._readonly_token)
        if operator:
            return "operator"
        if readonly:
            return "readonly"
        return None

    @staticmethod
    def _matches(given: bytes, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(given, token.encode())

    def read(self, request: Request) -> UiSession | None:
        """The request's session, if its cookie is valid and current."""
        value = request.cookies.get(self.cookie_name)
        if value is None:
            return None
        try:
            data = self._serializer.loads(value, max_age=SESSION_SECONDS)
        except BadSignature:  # SignatureExpired included
            return None
        if not isinstance(data, dict):
            return None
        role, csrf = data.get("role"), data.get("csrf")
        if role not in ("operator", "readonly") or not isinstance(csrf, str):
            return None
        return UiSession(role=role, csrf=csrf)

    def start(
        self, response: Response, request: Request, role: Role, *, csrf: str | None = None
    ) -> UiSession:
        """A new session of ``role`` (with CSRF token ``csrf``, else a new one), its
        cookie set on ``response``."""
        session = UiSession(role=role, csrf=csrf or new_csrf_token())
        response.set_cookie(
            self.cookie_name,
            self._serializer.dumps({"role": session.role, "csrf": session.csrf}),
            max_age=SESSION_SECONDS,
            path="/ui",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return session

    def end(self, response: Response) -> None:
        response.delete_cookie(self.cookie_name, path="/ui", httponly=True, samesite="strict")


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_matches(session: UiSession, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), session.csrf.encode())
