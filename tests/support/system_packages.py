"""What a test does when a system package it needs is missing."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing_package(message: str) -> NoReturn:
    """Skip the test with ``message`` (what is missing, how to install it) when run by
    hand; fail it under CI (``CI`` set, as .ci/run does), which installs every such
    package first, so a skip there would hide a broken install."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
