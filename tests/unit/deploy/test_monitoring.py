"""The Prometheus alerts and the Grafana dashboard: well formed, reading only series that
exist, covering what operators need, each alert with a runbook in docs/operations.md."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dispatcher import examples
from dispatcher.core.metrics import WAKEUP_SOURCES, Metrics
from dispatcher.core.queries import queries_for
from dispatcher.core.version import VERSION
from dispatcher.services.claiming import LeaderClaims
from dispatcher.services.dispatch import Dispatcher
from dispatcher.services.queue_stats import export_queue_depth
from dispatcher.services.slots import Slots
from dispatcher.services.wakeup import Wakeup
from tests.unit.deploy.support import (
    ALERTS,
    DASHBOARD,
    EXTERNAL_ALERT_METRICS,
    OPERATIONS,
    ROOT,
    alert_rules,
    dashboard_queries,
    kubernetes_problems,
    label_matchers,
    load_yaml_documents,
    markdown_anchors,
    metric_names,
    unknown_metric_names,
    vector_selectors,
)

SCOPED = ('namespace="$namespace"', 'job="$job"')
HISTOGRAM_QUANTILE = re.compile(r"histogram_quantile\(\s*(0?\.\d+|1)\s*,\s*sum by \(([^)]*)\)")


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def rules_reading(metric: str) -> list[dict[str, Any]]:
    return [rule for rule in alert_rules() if metric in metric_names(rule["expr"])]


def unknown_names_by_alert(path: Path) -> dict[str, set[str]]:
    (rule_file,) = load_yaml_documents(path)
    return {
        rule["alert"]: unknown_metric_names(rule["expr"], EXTERNAL_ALERT_METRICS)
        for group in rule_file["spec"]["groups"]
        for rule in group["rules"]
    }


def panel_queries(dashboard: dict[str, Any]) -> dict[str, list[str]]:
    """Panel title -> the PromQL of its targets (Grafana variables as dashboard_queries
    leaves them)."""
    queries: dict[str, list[str]] = {}
    for where, expr in dashboard_queries(dashboard):
        if where.startswith("panel "):
            queries.setdefault(where.removeprefix("panel ").strip("'"), []).append(expr)
    return queries


def panels_reading(dashboard: dict[str, Any], *metrics: str) -> list[str]:
    """Titles of the panels whose queries, together, read every one of ``metrics``."""
    return [
        title
        for title, queries in panel_queries(dashboard).items()
        if set(metrics) <= {name for expr in queries for name in metric_names(expr)}
    ]


# --- alerts --------------------------------------------------------------------------------


def test_the_alert_rules_are_well_formed_and_have_runbooks() -> None:
    (rule_file,) = load_yaml_documents(ALERTS)
    assert kubernetes_problems(rule_file) == []
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "two alerts share a name"
    anchors = markdown_anchors(OPERATIONS)
    for rule in rules:
        name = rule["alert"]
        assert name.startswith("Dispatcher"), name
        assert rule["expr"].strip() and rule["for"], name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert (ROOT / page).resolve() == OPERATIONS, f"{name}: runbook is not in operations.md"
        assert anchor == name.lower(), f"{name}: runbook anchor #{anchor}"
        assert anchor in anchors, f"{name}: docs/operations.md has no section #{anchor}"


def test_the_alerts_cover_leadership_backlog_failures_rescues_and_readiness() -> None:
    leader_rules = rules_reading("dispatcher_is_leader")
    no_leader = [r for r in leader_rules if re.search(r"\)\s*<\s*1\b", r["expr"])]
    assert no_leader, "no alert fires when no replica leads"
    assert all("absent(dispatcher_is_leader)" in r["expr"] for r in no_leader), (
        "no leader must also fire when no replica is scraped at all"
    )
    assert no_leader[0]["labels"]["severity"] == "critical"
    assert [r for r in leader_rules if re.search(r"\)\s*>\s*1\b", r["expr"])], (
        "no alert fires when more than one replica leads"
    )
    assert rules_reading("dispatcher_queue_oldest_pending_age_seconds"), "no backlog alert"
    ratio = [
        r
        for r in rules_reading("dispatcher_jobs_failed_total")
        if "dispatcher_jobs_completed_total" in metric_names(r["expr"]) and "/" in r["expr"]
    ]
    assert ratio, "no alert on the ratio of failed to finished jobs"
    assert rules_reading("dispatcher_jobs_rescued_total"), "no alert on rescued jobs"
    readiness = rules_reading("kube_deployment_status_replicas_available")
    assert readiness and "kube_deployment_spec_replicas" in metric_names(readiness[0]["expr"]), (
        "no alert on replicas that are not ready"
    )
    assert rules_reading("up"), "no alert on replicas Prometheus cannot scrape"


def test_alert_queries_read_only_metrics_dispatcher_exposes() -> None:
    read = set()
    for rule in alert_rules():
        assert unknown_metric_names(rule["expr"], EXTERNAL_ALERT_METRICS) == set(), rule["alert"]
        read |= metric_names(rule["expr"])
    assert read >= EXTERNAL_ALERT_METRICS, "EXTERNAL_ALERT_METRICS lists series no alert reads"


def test_the_metric_check_catches_made_up_names(tmp_path: Path) -> None:
    exposed = Metrics().exposed_names()
    assert "dispatcher_jobs_rescued_total" in exposed
    assert unknown_metric_names("rate(dispatcher_jobs_exploded_total[5m]) > 0") == {
        "dispatcher_jobs_exploded_total"
    }
    # A counter without _total, a histogram without _bucket, a series kube-state-metrics
    # has but the alerts do not declare.
    assert unknown_metric_names("dispatcher_jobs_completed > 0") == {"dispatcher_jobs_completed"}
    assert unknown_metric_names(
        "histogram_quantile(0.9, sum by (le) (rate(dispatcher_job_duration_seconds[5m])))"
    ) == {"dispatcher_job_duration_seconds"}
    assert unknown_metric_names(
        'kube_deployment_status_replicas_ready{deployment="dispatcher"} < 3',
        EXTERNAL_ALERT_METRICS,
    ) == {"kube_deployment_status_replicas_ready"}
    assert unknown_metric_names('{__name__="dispatcher_is_leadr"} == 0') == {"dispatcher_is_leadr"}

    # A typo planted in a copy of the alert file is found in the rule that holds it
    # (and only there: whatever the real file gets wrong is another test's failure).
    text = ALERTS.read_text(encoding="utf-8")
    assert text.count("dispatcher_jobs_rescued_total") >= 2
    planted = tmp_path / "alerts.yaml"
    planted.write_text(
        text.replace("dispatcher_jobs_rescued_total", "dispatcher_job_rescued_total")
    )
    before = unknown_names_by_alert(ALERTS)
    new = {alert: names - before[alert] for alert, names in unknown_names_by_alert(planted).items()}
    assert {alert: names for alert, names in new.items() if names} == {
        "DispatcherJobsRescued": {"dispatcher_job_rescued_total"}
    }

    with pytest.raises(ValueError):
        metric_names("sum(rate(dispatcher_jobs_failed_total[5m])")
    with pytest.raises(ValueError):
        metric_names("rate(dispatcher_jobs_failed_total[5 minutes])")


# --- dashboard --------------------------------------------------------------------------------


def test_the_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"]
    assert "id" not in dashboard or dashboard["id"] is None, "an id ties it to one Grafana"
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "two panels share an id"

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "namespace", "job", "type"}
    assert variables["datasource"]["query"] == "prometheus"

    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        title = panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, f"{title}: outside the grid"
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{title}: overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), f"{title}: refIds"
        for target in panel["targets"]:
            expr = target["expr"]
            for scope in SCOPED:
                assert scope in expr, f"{title}: {expr} ignores the selected {scope}"
            if "$type" in expr:
                assert 'type=~"$type"' in expr, f"{title}: $type is multi-valued, use =~"
            for name in re.findall(r"\$\{?(\w+)", expr):
                assert name in variables or name.startswith("__"), f"{title}: ${name}"


def test_dashboard_queries_read_only_metrics_dispatcher_exposes() -> None:
    queries = dashboard_queries(load_dashboard())
    assert len(queries) > 20
    for where, expr in queries:
        assert unknown_metric_names(expr) == set(), f"{where}: {expr}"


def test_the_dashboard_shows_what_operators_need() -> None:
    dashboard = load_dashboard()
    queries = panel_queries(dashboard)

    throughput = panels_reading(
        dashboard, "dispatcher_jobs_completed_total", "dispatcher_jobs_failed_total"
    )
    assert throughput, "no panel shows jobs finishing"
    assert any(
        re.search(r"sum by \(type\) \(rate\(dispatcher_jobs_(completed|failed)_total", expr)
        for title in throughput
        for expr in queries[title]
    ), "throughput is not broken down by type and outcome"

    depth = panels_reading(dashboard, "dispatcher_queue_depth")
    assert any("by (type, state)" in e for title in depth for e in queries[title]), (
        "no panel shows queue depth by type and state"
    )
    assert panels_reading(dashboard, "dispatcher_queue_oldest_pending_age_seconds")

    for histogram in ("dispatcher_job_queue_wait_seconds", "dispatcher_job_duration_seconds"):
        quantiles = set()
        for title in panels_reading(dashboard, f"{histogram}_bucket"):
            for expr in queries[title]:
                for quantile, grouping in HISTOGRAM_QUANTILE.findall(expr):
                    assert "le" in [g.strip() for g in grouping.split(",")], f"{title}: by le"
                    quantiles.add(float(quantile))
        assert {0.5, 0.95, 0.99} <= quantiles, f"{histogram}: percentiles {sorted(quantiles)}"

    assert panels_reading(dashboard, "dispatcher_jobs_running", "dispatcher_concurrency_limit"), (
        "no panel sets running jobs against the limits"
    )
    assert panels_reading(dashboard, "dispatcher_is_leader")
    assert panels_reading(dashboard, "dispatcher_leader_term")
    assert panels_reading(dashboard, "dispatcher_leader_transitions_total")
    assert panels_reading(dashboard, "dispatcher_jobs_rescued_total"), "no panel shows rescues"
    assert panels_reading(dashboard, "dispatcher_database_errors_total")


# --- every queried series exists on a fresh replica --------------------------------------

# Added by the scrape (Prometheus Operator), not by the replica.
SCRAPE_LABELS = {"namespace", "job", "pod", "instance"}


def fresh_replica_page(metrics: Metrics) -> str:
    """The /metrics page of a replica of dispatcher.examples:app just started and elected:
    what Runtime.start builds that sets series (no database: they only keep their pool),
    then the leader's first count of an empty queue."""
    app = examples.app
    wakeup = Wakeup()
    slots = Slots(app.executors, wakeup=wakeup, metrics=metrics)
    mode = LeaderClaims(app, queries_for("dispatcher"), "r", is_leader=lambda: True)
    Dispatcher(
        pool=None, app=app, schema="dispatcher", owner_id="r", mode=mode, slots=slots,
        wakeup=wakeup, deliver=lambda outcome: None, threads=None, metrics=metrics,
    )  # fmt: skip
    metrics.init_series(app.executors, version=VERSION, replica="r")
    export_queue_depth(metrics, [])
    return generate_latest(metrics.registry).decode()


def selects(matcher: promql_parser.Matcher, labels: dict[str, str]) -> bool:
    if matcher.name in SCRAPE_LABELS or matcher.name == "__name__" or "$" in matcher.value:
        return True  # a Grafana variable ($type) may take any value the series has
    value = labels.get(matcher.name, "")
    if matcher.op == promql_parser.MatchOp.Equal:
        return value == matcher.value
    if matcher.op == promql_parser.MatchOp.NotEqual:
        return value != matcher.value
    found = re.fullmatch(matcher.value, value) is not None
    return found if matcher.op == promql_parser.MatchOp.Re else not found


def missing_series(page: str) -> list[str]:
    """Every dispatcher_* selector of an alert or a dashboard query that no sample on
    ``page`` satisfies: a query that would see nothing (increase() and rate() miss the
    first event of a series born at it)."""
    samples = [
        (sample.name, sample.labels)
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    ]
    queries = [(rule["alert"], rule["expr"]) for rule in alert_rules()]
    queries += dashboard_queries(load_dashboard())
    missing = []
    for where, expr in queries:
        for selector in vector_selectors(expr):
            name = next(iter(metric_names(str(selector))))
            if not name.startswith("dispatcher_"):
                continue
            matchers = label_matchers(selector)
            if not any(
                sample == name and all(selects(m, labels) for m in matchers)
                for sample, labels in samples
            ):
                missing.append(f"{where}: {selector}")
    return missing


def test_every_series_the_alerts_and_the_dashboard_query_exists_on_a_fresh_replica() -> None:
    assert missing_series(fresh_replica_page(Metrics())) == []


def test_the_series_check_catches_series_born_at_their_first_event() -> None:
    # What a replica exported before init_series: no counter of a labelled series.
    bare = Metrics()
    bare.info.labels(VERSION, "r").set(1)
    missing = missing_series(generate_latest(bare.registry).decode())
    for name, selected in (
        ("dispatcher_jobs_rescued_total", ""),
        ("dispatcher_database_errors_total", ""),
        ("dispatcher_leader_transitions_total", 'event="elected"'),
        ("dispatcher_concurrency_limit", 'type="*"'),
        ("dispatcher_queue_depth", 'state="ready"'),
    ):
        assert any(f": {name}{{" in line and selected in line for line in missing), name


def test_every_wakeup_source_is_initialised() -> None:
    # The claim loop's wake-up sources are strings its callers pass; each must be in
    # WAKEUP_SOURCES, or its series is born at its first wake-up.
    package = Path(examples.__file__).parent
    called = {
        source
        for path in package.glob("*.py")
        for source in re.findall(
            r"(?:wake|start_claiming)\(\s*\"(\w+)\"\s*\)", path.read_text(encoding="utf-8")
        )
    }
    assert called, "no wake-up source found: has the call changed its name?"
    assert called <= set(WAKEUP_SOURCES), sorted(called - set(WAKEUP_SOURCES))
