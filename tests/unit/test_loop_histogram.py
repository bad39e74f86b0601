"""LoopHistogram shows on the page exactly what prometheus_client's Histogram shows."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from dispatcher.core.loop_histogram import LoopHistogram
from dispatcher.core.metrics import DURATION_BUCKETS, Metrics

# On a bound, between bounds, below the first, above the last, zero.
AMOUNTS = [0.001, 0.0011, 0.0001, 0.5, 4000.0, 0.0, 2.5, 2.49, 0.003]


def page(histogram_class: type[Histogram] | type[LoopHistogram]) -> str:
    registry = CollectorRegistry()
    histogram = histogram_class(
        "t_seconds", "Help text", ["type"], buckets=DURATION_BUCKETS, registry=registry
    )
    histogram.labels("a")  # created at zero, never observed
    for i, amount in enumerate(AMOUNTS):
        histogram.labels("b" if i % 3 else "c").observe(amount)
    return generate_latest(registry).decode()


def test_the_page_is_prometheus_clients_byte_for_byte() -> None:
    expected = page(Histogram)
    assert 't_seconds_bucket{le="0.001",type="b"}' in expected  # the test sees series
    assert page(LoopHistogram) == expected


def test_cleared_series_leave_the_page() -> None:
    registry = CollectorRegistry()
    histogram = LoopHistogram("t_seconds", "Help", ["type"], buckets=[1.0], registry=registry)
    histogram.labels("a").observe(0.5)
    histogram.clear()
    assert 'type="a"' not in generate_latest(registry).decode()


def test_a_wrong_label_count_is_refused_with_the_names() -> None:
    histogram = LoopHistogram("t_seconds", "Help", ["type"], buckets=[1.0])
    with pytest.raises(ValueError, match=r"t_seconds takes labels \('type',\), got \('a', 'b'\)"):
        histogram.labels("a", "b")


def test_the_job_histograms_are_named_and_bounded_as_before() -> None:
    metrics = Metrics()
    metrics.init_series(["known"], version="v", replica="r")
    metrics.job_duration.labels("unregistered").observe(0.2)
    metrics.job_queue_wait.labels("known").observe(0.2)
    text = generate_latest(metrics.registry).decode()
    assert 'dispatcher_job_duration_seconds_count{type="(other)"} 1.0' in text
    assert 'dispatcher_job_queue_wait_seconds_bucket{le="0.25",type="known"} 1.0' in text
    assert 'dispatcher_job_queue_wait_seconds_sum{type="known"} 0.2' in text
