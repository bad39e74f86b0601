"""The ``dispatcher`` command line (``main``) and ``dispatcher dev`` (``devrun``)."""

from dispatcher.cli.main import main

__all__ = ["main"]
