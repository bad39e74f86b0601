"""What the routes share, as FastAPI dependencies: the replica they serve, its
settings, one AsyncClient on its pool, and the bearer-token check.

``build_api`` stores one ``ApiContext`` on ``app.state``; the dependencies below read
it from the request, so a route names what it needs (``client: ClientDep``) and stays
a plain async function that a test can call with stand-ins. They take nothing but the
request, so they add nothing to the OpenAPI description except the bearer scheme.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any, Protocol

import asyncpg
from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from dispatcher.core.config import Settings
from dispatcher.core.metrics import Metrics
from dispatcher.producers.async_client import AsyncClient


class ReplicaView(Protocol):
    """What the API needs from the replica it runs in (the Runtime provides it)."""

    owner_id: str
    settings: Settings
    metrics: Metrics
    version: str
    started_at: float

    @property
    def role(self) -> str: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def term(self) -> int | None: ...

    @property
    def pool(self) -> asyncpg.Pool: ...

    def running_by_type(self) -> dict[str, int]: ...

    def claiming_problem(self) -> str | None:
        """Why this replica's claim loop cannot start, while it cannot (else None)."""
        ...

    def limits(self) -> dict[str, Any]: ...

    def status_extras(self) -> dict[str, Any]: ...


class ApiContext:
    """What one replica's API shares across requests: the replica, its settings (read
    once, when the API is built), whether it may run without a token, and the
    AsyncClient of every route."""

    def __init__(self, replica: ReplicaView, *, insecure_no_auth: bool) -> None:
        self.replica = replica
        self.settings = replica.settings
        self.insecure_no_auth = insecure_no_auth
        self._client: AsyncClient | None = None

    def client(self) -> AsyncClient:
        # Built at the first request, not with the API: the runtime builds its API
        # before it opens the pool (``replica.pool`` raises until then).
        if self._client is None:
            self._client = AsyncClient(pool=self.replica.pool, schema=self.settings.schema)
        return self._client


def api_context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context
    return context


ContextDep = Annotated[ApiContext, Depends(api_context)]


def replica_view(context: ContextDep) -> ReplicaView:
    return context.replica


def replica_settings(context: ContextDep) -> Settings:
    return context.settings


def async_client(context: ContextDep) -> AsyncClient:
    return context.client()


ReplicaDep = Annotated[ReplicaView, Depends(replica_view)]
SettingsDep = Annotated[Settings, Depends(replica_settings)]
ClientDep = Annotated[AsyncClient, Depends(async_client)]

# One instance: it is the "HTTPBearer" security scheme of the OpenAPI description.
bearer = HTTPBearer(auto_error=False, description="DISPATCHER_API_TOKEN")


def require_token(
    context: ContextDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> None:
    """The bearer token, compared in constant time: 401 if missing or wrong; 403 on
    every guarded route when no token is configured, unless ``--insecure-no-auth``."""
    token = context.settings.api_token
    if token is None:
        if context.insecure_no_auth:
            return
        raise HTTPException(
            403,
            "the API is disabled: no DISPATCHER_API_TOKEN is configured (set one, or "
            "start with --insecure-no-auth for local development)",
        )
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(
            401,
            "missing or wrong bearer token (Authorization: Bearer $DISPATCHER_API_TOKEN)",
            headers={"WWW-Authenticate": "Bearer"},
        )
