"""Structured logging with structlog: JSON lines in production, console on a TTY.

Every line carries the replica id (added by a processor, so it reaches log lines
written from worker threads too); services bind ``service=...``, job lines bind job
id, type and attempt. Events are short snake_case names with fields.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from structlog.typing import FilteringBoundLogger

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


def configure_logging(fmt: str = "auto", level: str = "info", **always: Any) -> None:
    """Configure structlog for this process.

    ``fmt``: "json", "console", or "auto" (console when stderr is a TTY). ``always``:
    fields added to every line (e.g. ``replica="pod-1"``).
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())

    def add_always(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
        for key, value in always.items():
            event.setdefault(key, value)
        return event

    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_always,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if use_json else _keep_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def _keep_exc_info(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
    # The console renderer formats exc_info itself, with a readable traceback.
    return event


# What every logger of the package is: structlog's, filtered by level at configure().
Logger = FilteringBoundLogger


def get_logger(service: str, **fields: Any) -> Logger:
    """A logger bound to ``service`` (and any other fields)."""
    logger: Logger = structlog.get_logger().bind(service=service, **fields)
    return logger
