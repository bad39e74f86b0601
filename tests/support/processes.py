"""Child processes of the tests: replicas and stand-ins, with their logs kept."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.database.ports import free_listen_port


async def leader_name(conn: asyncpg.Connection, schema: str) -> str | None:
    """The replica name (DISPATCHER_REPLICA_ID) of the leader whose lease is current
    on the database clock, if one is."""
    holder = await conn.fetchval(f'SELECT holder FROM "{schema}".leader WHERE lease_until > now()')
    return holder.split("-")[0] if holder else None


async def start_replicas(
    app: str, names: tuple[str, ...], *, env: dict[str, str], log_dir: Path, into: list[Any]
) -> None:
    """Start real replicas ``names`` of ``app`` (logs under ``log_dir``), appended to
    ``into`` (a test's ``replicas`` fixture, which stops them), and wait until each is
    healthy."""
    started = [ReplicaProcess(app, name=n, env=env, log_path=log_dir / n) for n in names]
    into.extend(started)
    for replica in started:
        await asyncio.to_thread(replica.wait_healthy)


def free_port() -> int:
    """A port for a server a test may restart on it: below the ephemeral range, where
    no client's connection can take it while the server is down."""
    return free_listen_port()


class ChildProcess:
    """A Python child process whose logs go to ``log_path``."""

    def __init__(
        self,
        args: list[str],
        *,
        log_path: Path,
        env: dict[str, str],
        stdout: int | None = None,
    ) -> None:
        self.log_path = log_path
        self._log_file = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, *args],
            stdout=self._log_file if stdout is None else stdout,
            stderr=self._log_file if stdout is not None else subprocess.STDOUT,
            text=True,
            env={**os.environ, **env},
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: signal.Signals) -> float:
        """Send ``sig``; return the wall-clock time it was sent."""
        sent = time.time()
        self.process.send_signal(sig)
        return sent

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (after a SIGCONT, in case it is stopped), SIGKILL after ``timeout``."""
        if self.alive:
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._after_stop()
        self._log_file.close()
        return self.process.returncode

    def _after_stop(self) -> None:
        return None

    def log_tail(self, lines: int = 40) -> str:
        self._log_file.flush()
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""


class EventedProcess(ChildProcess):
    """A child that reports events as JSON lines on stdout, collected for tests to
    wait on; its stderr (logs) goes to ``log_path``."""

    def __init__(self, args: list[str], *, log_path: Path, env: dict[str, str] | None = None):
        super().__init__(args, log_path=log_path, env=env or {}, stdout=subprocess.PIPE)
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "stdout", "line": line.rstrip()}
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()

    def _after_stop(self) -> None:
        self._reader.join(5)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        with self._changed:
            return [e for e in self.events if e["event"] == kind]

    def wait_for(
        self, kind: str, *, count: int = 1, timeout: float, what: str = ""
    ) -> dict[str, Any]:
        """Wait until ``count`` events of ``kind`` arrived; return the last of them."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [e for e in self.events if e["event"] == kind]
                if len(found) >= count:
                    return found[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (not self.alive and not self._reader.is_alive()):
                    raise AssertionError(
                        f"pid {self.pid}: no {kind!r} event #{count} within {timeout}s "
                        f"{what}; events: {self.events[-5:]}; log tail:\n{self.log_tail()}"
                    )
                self._changed.wait(min(remaining, 0.1))

    def believes_leader(self) -> bool:
        """Whether its latest elected/deposed event is 'elected'."""
        with self._changed:
            for event in reversed(self.events):
                if event["event"] in ("elected", "deposed", "exited"):
                    return bool(event["event"] == "elected")
        return False


class ReplicaProcess(ChildProcess):
    """A real ``dispatcher run APP`` process on a free port, JSON logs to ``log_path``."""

    def __init__(self, app: str, *, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.port = free_port()
        super().__init__(
            ["-m", "dispatcher.cli", "run", app],
            log_path=log_path,
            env={
                "DISPATCHER_LOG_FORMAT": "json",
                "DISPATCHER_REPLICA_ID": name,
                "DISPATCHER_HTTP_HOST": "127.0.0.1",
                "DISPATCHER_HTTP_PORT": str(self.port),
                **env,
            },
        )

    def wait_healthy(self, timeout: float = 30) -> None:
        """Wait until /healthz answers (fails at once if the process died)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise AssertionError(f"{self.name} exited: {self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)  # the poll interval of this wait
        raise AssertionError(f"{self.name} not healthy within {timeout}s: {self.log_tail()}")

    def metric_total(self, sample: str) -> float:
        """The sum of every series of ``sample`` (e.g. ``dispatcher_wakeups_total``)
        on the replica's /metrics page; 0 if it has none."""
        page = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5)
        page.raise_for_status()
        return sum(
            s.value
            for family in text_string_to_metric_families(page.text)
            for s in family.samples
            if s.name == sample
        )
