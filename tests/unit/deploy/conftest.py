"""Fixtures of the deployment tests."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.deploy.support import OVERLAY, by_identity, render_kustomization


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str, str], dict[str, Any]]:
    """The example overlay, rendered (kind, namespace, name) -> object."""
    return by_identity(render_kustomization(OVERLAY))
