"""The overview's charts as geometry for inline SVG, computed on the server: no
JavaScript library, nothing to download, numbers only (nothing from a job row).

Both charts span the last hour, one slot per minute, oldest on the left; the
templates draw them (``_charts.html``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from dispatcher.http.ui.reads import MinuteSample

WIDTH = 600
HEIGHT = 120
MINUTES = 60
_SLOT = WIDTH / MINUTES


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    kind: str  # "completed" or "failed": the bar's colour
    title: str


@dataclass(frozen=True)
class Chart:
    """One chart: its largest value (the top of the scale), its bars (a bar chart) or
    polyline points (a line chart), and a sentence for screen readers."""

    peak: int
    bars: list[Bar]
    points: str
    summary: str
    width: int = WIDTH
    height: int = HEIGHT


def _slots(samples: Sequence[MinuteSample], now: dt.datetime) -> list[MinuteSample | None]:
    """The last MINUTES minutes ending with ``now``'s, each its sample or None."""
    by_minute = {s.minute.replace(second=0, microsecond=0): s for s in samples}
    last = now.replace(second=0, microsecond=0)
    return [by_minute.get(last - dt.timedelta(minutes=MINUTES - 1 - i)) for i in range(MINUTES)]


def _scale(value: int, peak: int) -> float:
    return 0.0 if peak <= 0 else HEIGHT * value / peak


def throughput_chart(samples: Sequence[MinuteSample], now: dt.datetime) -> Chart:
    """Completed (one bar) and failed (a bar stacked on it) jobs per minute."""
    slots = _slots(samples, now)
    peak = max((s.completed + s.failed for s in slots if s is not None), default=0)
    bars: list[Bar] = []
    for i, sample in enumerate(slots):
        if sample is None or sample.completed + sample.failed == 0:
            continue
        x = i * _SLOT + 1
        done_h = _scale(sample.completed, peak)
        failed_h = _scale(sample.failed, peak)
        label = f"{sample.minute:%H:%M}: {sample.completed} completed, {sample.failed} failed"
        bars.append(Bar(x, HEIGHT - done_h, _SLOT - 2, done_h, "completed", label))
        if sample.failed:
            bars.append(Bar(x, HEIGHT - done_h - failed_h, _SLOT - 2, failed_h, "failed", label))
    total_done = sum(s.completed for s in slots if s is not None)
    total_failed = sum(s.failed for s in slots if s is not None)
    return Chart(
        peak=peak,
        bars=bars,
        points="",
        summary=f"last hour: {total_done} completed, {total_failed} failed; "
        f"busiest minute {peak} jobs",
    )


def depth_chart(samples: Sequence[MinuteSample], now: dt.datetime) -> Chart:
    """Jobs waiting (ready and scheduled) at the end of each minute, as a line."""
    slots = _slots(samples, now)
    values = [(i, s.ready + s.scheduled) for i, s in enumerate(slots) if s is not None]
    peak = max((v for _, v in values), default=0)
    points = " ".join(f"{(i + 0.5) * _SLOT:.1f},{HEIGHT - _scale(v, peak):.1f}" for i, v in values)
    latest = values[-1][1] if values else 0
    return Chart(
        peak=peak,
        bars=[],
        points=points,
        summary=f"queue depth over the last hour: now {latest}, at most {peak}",
    )
