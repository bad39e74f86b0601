r"""The HTTP API's OpenAPI description is exactly the one checked into the repository.

``build_api`` on a stand-in replica (no database) renders its document, which is
compared with tests/integration/openapi_snapshot.json (keys sorted: the order of
paths in the served document is not part of the contract). A change to a route, a
body model, a status code, a tag or the security scheme shows up as a diff of that
file in review; a change that was not meant to alter the API fails here.

After an intended change, regenerate the snapshot and commit it with the change:

    DISPATCHER_UPDATE_OPENAPI_SNAPSHOT=1 make test \
        PYTEST_ARGS=tests/integration/test_http_openapi.py
"""

from __future__ import annotations

import difflib
import json
import os
import types
from pathlib import Path
from typing import Any

from fastapi.routing import APIRoute

from dispatcher.core.config import Settings
from dispatcher.core.metrics import Metrics
from dispatcher.http.app import build_api
from dispatcher.http.dependencies import require_token

SNAPSHOT = Path(__file__).with_name("openapi_snapshot.json")
UPDATE_VARIABLE = "DISPATCHER_UPDATE_OPENAPI_SNAPSHOT"
REGENERATE = f"{UPDATE_VARIABLE}=1 make test PYTEST_ARGS=tests/integration/test_http_openapi.py"
OPEN_ROUTES = {"/healthz", "/readyz", "/metrics"}


def stand_in_replica() -> Any:
    """What build_api reads of a replica (the ReplicaView protocol), with no pool."""
    return types.SimpleNamespace(
        owner_id="replica-1-abcdef",
        settings=Settings(api_token="token"),
        metrics=Metrics(),
        version="0.0.0",
        started_at=0.0,
        role="standby",
        stopping=False,
        term=None,
        pool=None,
        running_by_type=dict,
        claiming_problem=lambda: None,
        limits=dict,
        status_extras=dict,
    )


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_the_openapi_document_is_the_checked_in_snapshot() -> None:
    current = render(build_api(stand_in_replica()).openapi())
    if os.environ.get(UPDATE_VARIABLE):
        SNAPSHOT.write_text(current)
    expected = SNAPSHOT.read_text()
    if current != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                current.splitlines(keepends=True),
                "openapi_snapshot.json",
                "build_api(...).openapi()",
            )
        )
        raise AssertionError(
            f"the OpenAPI document differs from {SNAPSHOT.name}; if the change is "
            f"intended, regenerate it with\n  {REGENERATE}\n{diff}"
        )


def test_every_route_but_the_probes_requires_the_token() -> None:
    # The dashboard's routes have a login of their own (test_dashboard.py).
    routes = [
        route
        for route in build_api(stand_in_replica()).routes
        if isinstance(route, APIRoute) and not route.path.startswith("/ui")
    ]
    assert {route.path for route in routes} >= OPEN_ROUTES | {"/status", "/jobs", "/types"}
    for route in routes:
        guarded = any(d.dependency is require_token for d in route.dependencies)
        assert guarded == (route.path not in OPEN_ROUTES), (route.path, route.methods)
