"""How the command line prints: one line on stderr for a problem, tables for people,
``--json`` for scripts."""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any

from dispatcher.core.records import JobRecord
from dispatcher.producers.plans import ClusterStatus


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def short(value: Any, width: int = 60) -> str:
    text = "" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def when(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if value else ""


def show_job(job: JobRecord, as_json: bool) -> None:
    if as_json:
        print_json(job.to_json())
        return
    fields = job.to_json()
    errors = fields.pop("errors")
    for key, value in fields.items():
        if key in ("payload", "result", "progress") and value is not None:
            value = json.dumps(value)
        print(f"{key:17} {'' if value is None else value}")
    for error in errors:
        print(f"error #{error['attempt']} at {error['at']}: {error['error']}")


def status_json(status: ClusterStatus) -> dict[str, Any]:
    return {
        "leader": status.leader,
        "replicas": status.replicas,
        "queues": {t: vars(q) for t, q in status.queues.items()},
        "types": [vars(t) for t in status.types],
        "schedules": status.schedules,
    }
