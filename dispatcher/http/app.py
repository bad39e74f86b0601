"""The HTTP API every replica serves (FastAPI): health, readiness, metrics, status,
jobs, replicas, and its OpenAPI description.

``/healthz``, ``/readyz`` and ``/metrics`` are open (probes and scrapers); everything
else, ``/openapi.json`` included, needs ``Authorization: Bearer <DISPATCHER_API_TOKEN>``
(compared in constant time). With no token configured those routes answer 403,
unless the replica was started with ``--insecure-no-auth``.

Bad requests get a 4xx naming the field (unknown fields, wrong types, values out of
range, bodies over the size limit); a database outage gets 503, never a 500.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request

from dispatcher.http import cluster, job_types, jobs, probes
from dispatcher.http.body_limit import ENVELOPE_BYTES, BodyLimit
from dispatcher.http.dependencies import ApiContext, ReplicaView, require_token
from dispatcher.http.errors import register_error_handlers
from dispatcher.http.ui import install_dashboard


def build_api(replica: ReplicaView, *, insecure_no_auth: bool = False) -> FastAPI:
    """The FastAPI application of one replica."""
    api = FastAPI(
        title="dispatcher",
        version=replica.version,
        description=__doc__,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    api.state.context = ApiContext(replica, insecure_no_auth=insecure_no_auth)
    api.add_middleware(BodyLimit, limit=replica.settings.max_payload_bytes + ENVELOPE_BYTES)
    register_error_handlers(api)
    # Each router's routes are added as they are rather than with include_router:
    # since FastAPI 0.137 an included router is one opaque node in ``api.routes``,
    # where the tests and deployment checks read each route's path and methods. The
    # routes of an APIRouter carry its tags, dependencies and responses already; only
    # app.dependency_overrides (unused here) would not reach them.
    api.routes.extend(probes.router.routes)
    # Guarded like every route but the probes; FastAPI's own would be open.
    api.add_api_route(
        "/openapi.json",
        openapi,
        dependencies=[Depends(require_token)],
        include_in_schema=False,
    )
    for router in (cluster.router, jobs.router, job_types.router):
        api.routes.extend(router.routes)
    install_dashboard(api, api.state.context)
    return api


async def openapi(request: Request) -> dict[str, Any]:
    """This API's OpenAPI description (served behind the token, unlike FastAPI's)."""
    document: dict[str, Any] = request.app.openapi()
    return document
