"""The package's version: pyproject.toml's, as installed (the one place it is set)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("dispatcher")
except PackageNotFoundError:  # run from a checkout that was never installed
    VERSION = "0+unknown"
