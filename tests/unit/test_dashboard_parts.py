"""The dashboard's pure parts: chart geometry, times in words, the session cookie, the
job timeline, notices and login redirects. Pages and actions against a real Postgres
are in tests/integration/test_dashboard.py; in a real browser in
tests/browser/test_dashboard_browser.py."""

from __future__ import annotations

import datetime as dt

import pytest
from starlette.requests import Request
from starlette.responses import Response

from dispatcher.core.config import Settings
from dispatcher.core.records import JobRecord, JobStatus
from dispatcher.http.ui import session as session_module
from dispatcher.http.ui.actions import _safe_next
from dispatcher.http.ui.charts import HEIGHT, MINUTES, depth_chart, throughput_chart
from dispatcher.http.ui.pages import timeline
from dispatcher.http.ui.reads import MinuteSample
from dispatcher.http.ui.rendering import notice_text, relative_time
from dispatcher.http.ui.session import SessionCookies

NOW = dt.datetime(2026, 11, 30, 12, 30, 20, tzinfo=dt.UTC)


def sample(minutes_ago: int, completed: int = 0, failed: int = 0, ready: int = 0) -> MinuteSample:
    minute = NOW.replace(second=0) - dt.timedelta(minutes=minutes_ago)
    return MinuteSample(minute, completed, failed, ready, 0, 0)


def test_throughput_bars_stand_in_their_minute_scaled_to_the_busiest() -> None:
    chart = throughput_chart([sample(0, completed=30, failed=10), sample(59, completed=20)], NOW)
    assert chart.peak == 40
    newest = [b for b in chart.bars if b.x > 500]
    oldest = [b for b in chart.bars if b.x < 20]
    assert {b.kind for b in newest} == {"completed", "failed"}
    completed = next(b for b in newest if b.kind == "completed")
    failed = next(b for b in newest if b.kind == "failed")
    assert completed.height == pytest.approx(HEIGHT * 30 / 40)
    # Failed stacks on completed: together the bar reaches the top.
    assert failed.y == pytest.approx(0) and failed.y + failed.height == pytest.approx(completed.y)
    assert [b.kind for b in oldest] == ["completed"] and oldest[0].height == pytest.approx(
        HEIGHT / 2
    )
    assert "50 completed, 10 failed" in chart.summary


def test_samples_older_than_the_hour_and_empty_minutes_draw_nothing() -> None:
    chart = throughput_chart([sample(MINUTES), sample(3)], NOW)
    assert chart.bars == [] and chart.peak == 0


def test_the_depth_line_has_a_point_per_sampled_minute() -> None:
    chart = depth_chart([sample(2, ready=5), sample(1, ready=10)], NOW)
    points = [tuple(map(float, p.split(","))) for p in chart.points.split()]
    assert len(points) == 2
    assert points[0][0] < points[1][0]  # older on the left
    assert points[1][1] == pytest.approx(0.0) and points[0][1] == pytest.approx(HEIGHT / 2)
    assert "now 10" in chart.summary
    assert depth_chart([], NOW).points == ""


@pytest.mark.parametrize(
    ("seconds", "words"),
    [(0.2, "now"), (-5, "5 s ago"), (90, "in 1 min"), (-7300, "2 h ago"), (-3 * 86400, "3 d ago")],
)
def test_relative_times(seconds: float, words: str) -> None:
    assert relative_time(NOW + dt.timedelta(seconds=seconds), NOW) == words
    assert relative_time(None, NOW) == "—"


def request(cookies: dict[str, str] | None = None, query: str = "") -> Request:
    header = "; ".join(f"{k}={v}" for k, v in (cookies or {}).items())
    return Request(
        {
            "type": "http",
            "method": "GET",
            "scheme": "http",
            "path": "/ui/",
            "query_string": query.encode(),
            "headers": [(b"cookie", header.encode())] if header else [],
        }
    )


def issued_cookie(cookies: SessionCookies, role: session_module.Role) -> str:
    response = Response()
    cookies.start(response, request(), role)
    header = response.headers["set-cookie"]
    assert "HttpOnly" in header and "SameSite=strict" in header and "Path=/ui" in header
    assert f"Max-Age={session_module.SESSION_SECONDS}" in header
    return header.split(";", 1)[0].split("=", 1)[1]


def test_tokens_give_roles_and_the_cookie_reads_back() -> None:
    cookies = SessionCookies(
        Settings(api_token="op", ui_readonly_token="ro"), insecure_no_auth=False
    )
    assert cookies.role_of_token("op") == "operator"
    assert cookies.role_of_token("ro") == "readonly"
    assert cookies.role_of_token("opx") is None and cookies.role_of_token("") is None
    value = issued_cookie(cookies, "readonly")
    session = cookies.read(request({cookies.cookie_name: value}))
    assert session is not None and session.role == "readonly" and not session.can_act


def test_a_tampered_or_foreign_cookie_is_no_session() -> None:
    settings = Settings(api_token="op")
    cookies = SessionCookies(settings, insecure_no_auth=False)
    value = issued_cookie(cookies, "operator")
    payload, timestamp, signature = value.split(".")
    # A changed payload (a forged role) and a changed signature. Not the signature's
    # last characters: base64 of its 20 bytes leaves two bits of the last one unused, so
    # a new tail could decode to the same signature (it did in 21 of 20,000 cookies).
    for tampered in (
        f"{other_first(payload)}.{timestamp}.{signature}",
        f"{payload}.{timestamp}.{other_first(signature)}",
    ):
        assert cookies.read(request({cookies.cookie_name: tampered})) is None, tampered
    # Another token (a rotated one, another cluster): its cookies are not ours.
    other = SessionCookies(Settings(api_token="other"), insecure_no_auth=False)
    assert other.read(request({other.cookie_name: value})) is None
    assert cookies.read(request({cookies.cookie_name: value})) is not None


def other_first(text: str) -> str:
    """``text`` with its first character, six bits that all count, replaced."""
    return ("B" if text[0] == "A" else "A") + text[1:]


def test_an_expired_cookie_is_no_session(monkeypatch: pytest.MonkeyPatch) -> None:
    cookies = SessionCookies(Settings(api_token="op"), insecure_no_auth=False)
    value = issued_cookie(cookies, "operator")
    monkeypatch.setattr(session_module, "SESSION_SECONDS", -1)
    assert cookies.read(request({cookies.cookie_name: value})) is None


def test_without_tokens_only_insecure_mode_opens_the_dashboard() -> None:
    closed = SessionCookies(Settings(), insecure_no_auth=False)
    assert not closed.login_possible and not closed.open_access
    assert closed.role_of_token("") is None
    assert SessionCookies(Settings(), insecure_no_auth=True).open_access
    # A configured token wins over the flag, as in the API.
    assert not SessionCookies(Settings(api_token="op"), insecure_no_auth=True).open_access


def job(**fields: object) -> JobRecord:
    created = NOW - dt.timedelta(minutes=10)
    values: dict[str, object] = {
        "id": 1, "type": "t", "payload": {}, "status": JobStatus.PENDING, "priority": 0,
        "run_at": created, "attempts": 0, "max_attempts": None, "timeout": None,
        "unique_key": None, "created_at": created, "started_at": None, "finished_at": None,
        "heartbeat_at": None, "owner": None, "term": None, "progress": None, "result": None,
        "last_error": None,
    }  # fmt: skip
    values.update(fields)
    return JobRecord(**values)  # type: ignore[arg-type]


def at(minutes_ago: float) -> dt.datetime:
    return NOW - dt.timedelta(minutes=minutes_ago)


def test_the_timeline_shows_each_attempt_in_time_order() -> None:
    errors = [
        {"attempt": 1, "started_at": at(9).isoformat(), "at": at(8).isoformat(), "error": "E1"},
        {"attempt": 2, "started_at": at(6).isoformat(), "at": at(5).isoformat(), "error": "E2"},
    ]
    done = job(
        status=JobStatus.COMPLETED, attempts=3, started_at=at(2), finished_at=at(1), errors=errors
    )
    assert [e.what for e in timeline(done)] == [
        "created",
        "attempt 1 started",
        "attempt 1 failed: E1",
        "attempt 2 started",
        "attempt 2 failed: E2",
        "attempt 3 started",
        "completed",
    ]
    # Failed for good: the last attempt's start is in its error entry, not twice.
    failed = job(
        status=JobStatus.FAILED, attempts=2, started_at=at(6), finished_at=at(5), errors=errors
    )
    assert [e.what for e in timeline(failed)].count("attempt 2 started") == 1
    # Errors written before starts were recorded: the row's started_at stands in.
    old = job(
        status=JobStatus.FAILED,
        attempts=1,
        started_at=at(9),
        finished_at=at(8),
        errors=[{"attempt": 1, "at": at(8).isoformat(), "error": "E"}],
    )
    assert [e.what for e in timeline(old)] == [
        "created",
        "attempt 1 started",
        "attempt 1 failed: E",
        "failed",
    ]


def test_notices_are_fixed_sentences_with_counts() -> None:
    assert notice_text(request(query="notice=retried&n=3&skipped=1")) == (
        "3 job(s) back to pending; 1 skipped (not in a state that allows it)"
    )
    assert notice_text(request(query="notice=<b>hi</b>")) is None
    assert notice_text(request(query="notice=retried&n=abc")) == "0 job(s) back to pending"


@pytest.mark.parametrize(
    ("given", "goes_to"),
    [
        ("/ui/jobs?status=failed", "/ui/jobs?status=failed"),
        ("https://evil.example/ui/", "/ui/"),
        ("//evil.example/ui/", "/ui/"),
        ("/ui/\\evil", "/ui/"),
        ("/metrics", "/ui/"),
        (None, "/ui/"),
    ],
)
def test_after_logging_in_only_dashboard_paths(given: str | None, goes_to: str) -> None:
    assert _safe_next(given) == goes_to
