"""The dispatcher's burn-down beside PgQueuer and Procrastinate: same run, same database.

``make bench-peers`` installs the peers (bench/requirements-peers.txt) into their own
venv, .venv-peers, and runs this module in ours. It never imports a peer: each peer
run is a subprocess of the peers' interpreter running that peer's worker script in
this folder (``pgqueuer_worker.py``, ``procrastinate_worker.py``), which creates a
fresh schema, installs the library's tables there with the library's own installer,
enqueues N no-op jobs with the library's own bulk enqueue, drains them with the
library's own worker, prints one JSON line and drops the schema. pg-boss (Node) runs
the same way from ``pgboss/worker.mjs`` when ``node`` is on PATH and
``make bench-peers`` could ``npm install`` it; otherwise it is skipped with a line
saying why.

Every figure is read from a table on the database clock, as bench/burndown.py reads
the dispatcher's: jobs / (last completion - first start). For each concurrency C:

1. Grid: each peer at each point of its small grid (at most 4 points; see ``PEERS``),
   once; the fastest point is that peer's best configuration at C. Taking the best of
   noisy single runs favours the peer, which is the safe side for a ratio we claim.
2. Rounds (``--rounds``, 2 by default): the dispatcher's burn-down (one real
   ``dispatcher run`` process, ``DISPATCHER_CONCURRENCY=C``, a freshly migrated
   schema), then each peer at its best configuration, alternating, so a noisy
   minute on the shared machine hits all of them. Medians of the rounds are compared:
   the ratio printed is dispatcher / peer.

The target (the issue's): the dispatcher at least 3x PgQueuer's best at C = 100 and
1,000. All runs share one PostgreSQL: ``DISPATCHER_BENCH_DSN`` if set, else a private
embedded server (bench/common.py). One JSON line goes to bench/results/peers.jsonl.

    python -m bench.peers --python .venv-peers/bin/python [--jobs 20000]
                          [--concurrency 100,1000] [--rounds 2]
                          [--peers pgqueuer,procrastinate,pgboss]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.burndown import burn_down
from bench.common import Database, Result, database
from bench.raw_sql import parse_ints

HERE = Path(__file__).resolve().parent
TARGET = 3.0  # dispatcher / PgQueuer's best, at each concurrency
TARGET_PEER = "pgqueuer"

Config = dict[str, Any]


def pgqueuer_grid(concurrency: int) -> list[Config]:
    """The two largest batch sizes PgQueuer accepts at C (it requires C >= 2 x batch),
    each on one connection and on a pool of 4. Larger batches won every trial run:
    a batch is one dequeue and, with the status buffer sized like it, one write of
    completions."""
    batches = [b for b in (10, 50, 100, 500) if 2 * b <= concurrency][-2:]
    return [{"batch": b, "pool": pool} for b in batches for pool in (1, 4)]


def procrastinate_grid(concurrency: int) -> list[Config]:
    """The library's defaults (psycopg's pool of 4, LISTEN/NOTIFY on), a larger pool,
    and the smallest that works. Its worker fetches and finishes one job per call, so
    the pool is the knob; in trial runs more connections only lost on 2 cores."""
    return [
        {"pool": 4, "listen_notify": True},
        {"pool": 10, "listen_notify": True},
        {"pool": 2, "listen_notify": False},
    ]


def pgboss_grid(concurrency: int) -> list[Config]:
    """C in flight split over 1, 4 and 10 pollers (``localConcurrency``), each
    fetching C/pollers jobs per batch and completing them in one statement; pg-boss's
    pool of 10 (its default). One poller with the whole batch won at C = 100, four at
    1,000 in trial runs; a larger pool lost."""
    # A batch of 1 never counts as full, so its poller would wait 0.5 s between jobs.
    return [
        {"workers": workers, "batch": concurrency // workers, "pool": 10}
        for workers in (1, 4, 10)
        if concurrency // workers >= 2
    ]


@dataclass(frozen=True)
class Peer:
    name: str
    script: str  # file in this folder
    runtime: str  # "python" (the peers' venv) or "node"
    package: str  # whose version is reported
    grid: Callable[[int], list[Config]]


PEERS = {
    "pgqueuer": Peer("pgqueuer", "pgqueuer_worker.py", "python", "pgqueuer", pgqueuer_grid),
    "procrastinate": Peer(
        "procrastinate", "procrastinate_worker.py", "python", "procrastinate", procrastinate_grid
    ),
    "pgboss": Peer("pgboss", "pgboss/worker.mjs", "node", "pg-boss", pgboss_grid),
}


def label(config: Config) -> str:
    return ", ".join(f"{key} {value}" for key, value in config.items())


def flags(config: Config) -> list[str]:
    out: list[str] = []
    for key, value in config.items():
        name = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(name if value else "--no-" + key.replace("_", "-"))
        else:
            out += [name, str(value)]
    return out


async def capture(*argv: str, timeout: float) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a subprocess; a timeout kills it."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except OSError as exc:  # no such interpreter: the peer is reported, not fatal
        return -1, "", str(exc)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        return -1, "", f"no result within {timeout:.0f} s"
    return process.returncode or 0, out.decode(), err.decode()


class Runner:
    """Starts peers' worker scripts with the right interpreter, reporting failures
    as lines rather than exceptions so one broken peer never stops the others."""

    def __init__(self, python: str, dsn: str, jobs: int) -> None:
        self.python = python
        self.dsn = dsn
        self.jobs = jobs

    def launcher(self, peer: Peer) -> list[str]:
        if peer.runtime == "node":
            return ["node"]
        return [self.python]

    async def version(self, peer: Peer) -> str:
        """The installed version, or raise with the reason the peer cannot run."""
        if peer.runtime == "node":
            if shutil.which("node") is None:
                raise RuntimeError("node is not on PATH")
            manifest = HERE / "pgboss" / "node_modules" / peer.package / "package.json"
            if not manifest.exists():
                raise RuntimeError(f"{manifest} is missing (npm install did not run)")
            return str(json.loads(manifest.read_text())["version"])
        code = f"import importlib.metadata as m; print(m.version({peer.package!r}))"
        rc, out, err = await capture(self.python, "-c", code, timeout=60)
        if rc != 0:
            raise RuntimeError(f"not installed for {self.python}: {last_line(err)}")
        return out.strip()

    async def run(self, peer: Peer, concurrency: int, config: Config) -> float | None:
        argv = [
            *self.launcher(peer),
            str(HERE / peer.script),
            "--dsn",
            self.dsn,
            "--jobs",
            str(self.jobs),
            "--concurrency",
            str(concurrency),
            *flags(config),
        ]
        # Procrastinate drains about 500 jobs/s here: leave it room at 200,000 jobs.
        rc, out, err = await capture(*argv, timeout=120 + self.jobs / 50)
        if rc != 0:
            say(f"    {peer.name} ({label(config)}): FAILED (exit {rc}): {last_line(err)}")
            return None
        rate = float(json.loads(out.strip().splitlines()[-1])["rate"])
        say(f"    {peer.name} ({label(config)}): {rate:,.0f} jobs/s")
        return rate


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def say(line: str) -> None:
    print(line, flush=True)


@dataclass
class PeerRuns:
    version: str
    grid: list[tuple[Config, float | None]] = field(default_factory=list)
    best: Config | None = None
    rates: list[float] = field(default_factory=list)


@dataclass
class Measured:
    """One concurrency's figures."""

    dispatcher: list[float] = field(default_factory=list)
    peers: dict[str, PeerRuns] = field(default_factory=dict)


def runs(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


async def dispatcher_rate(db: Database, jobs: int, concurrency: int) -> float:
    await db.reset()
    rate = (await burn_down(db, jobs, concurrency)).rate
    say(f"    dispatcher: {rate:,.0f} jobs/s")
    return rate


async def main_async(args: argparse.Namespace) -> Result:
    by_concurrency = {c: Measured() for c in args.concurrency}
    with database() as db:
        say(f"database: {db.dsn.split('@')[-1]} ({args.jobs:,} jobs per run)")
        runner = Runner(args.python, db.dsn, args.jobs)
        available: dict[str, str] = {}
        for name in args.peers:
            peer = PEERS[name]
            try:
                available[name] = await runner.version(peer)
                say(f"{name} {available[name]}: ready")
            except RuntimeError as exc:
                say(f"{name}: SKIPPED, {exc}")
        for concurrency in args.concurrency:
            measured = by_concurrency[concurrency]
            say(f"concurrency {concurrency}: grid")
            for name, version in available.items():
                peer = PEERS[name]
                peer_runs = measured.peers[name] = PeerRuns(version)
                for config in peer.grid(concurrency):
                    rate = await runner.run(peer, concurrency, config)
                    peer_runs.grid.append((config, rate))
                ok = [(config, rate) for config, rate in peer_runs.grid if rate is not None]
                if ok:
                    peer_runs.best = max(ok, key=lambda point: point[1])[0]
            for round_ in range(args.rounds):
                say(f"concurrency {concurrency}: round {round_ + 1} of {args.rounds}")
                measured.dispatcher.append(await dispatcher_rate(db, args.jobs, concurrency))
                for name, peer_runs in measured.peers.items():
                    if peer_runs.best is None:
                        continue
                    rate = await runner.run(PEERS[name], concurrency, peer_runs.best)
                    if rate is not None:
                        peer_runs.rates.append(rate)
        await db.drop()
    return report(args, by_concurrency)


def report(args: argparse.Namespace, by_concurrency: dict[int, Measured]) -> Result:
    result = Result("peers")
    figures: dict[str, dict[str, Any]] = {}
    for concurrency, measured in by_concurrency.items():
        ours = statistics.median(measured.dispatcher)
        entry: dict[str, Any] = {"dispatcher": ours, "runs": measured.dispatcher, "peers": {}}
        result.add(
            f"concurrency {concurrency}: dispatcher burn-down, median",
            f"{ours:,.0f} jobs/s (runs: {runs(measured.dispatcher)})",
        )
        for name, peer_runs in measured.peers.items():
            grid = "; ".join(
                f"{label(config)}: {'failed' if rate is None else f'{rate:,.0f}'}"
                for config, rate in peer_runs.grid
            )
            if peer_runs.best is None or not peer_runs.rates:
                result.add(f"concurrency {concurrency}: {name}", f"no result (grid: {grid})")
                entry["peers"][name] = {"version": peer_runs.version, "grid": peer_runs.grid}
                continue
            theirs = statistics.median(peer_runs.rates)
            ratio = ours / theirs
            result.add(
                f"concurrency {concurrency}: {name} {peer_runs.version} best, median",
                f"{theirs:,.0f} jobs/s (runs: {runs(peer_runs.rates)}; "
                f"best of grid: {label(peer_runs.best)})",
            )
            result.add(f"concurrency {concurrency}: {name} grid", grid)
            verdict = ""
            if name == TARGET_PEER:
                met = "met" if ratio >= TARGET else "NOT met"
                verdict = f" (target >= {TARGET:.0f}x: {met})"
            result.add(f"concurrency {concurrency}: dispatcher / {name}", f"{ratio:.1f}x{verdict}")
            entry["peers"][name] = {
                "version": peer_runs.version,
                "best": peer_runs.best,
                "rate": theirs,
                "runs": peer_runs.rates,
                "grid": [{"config": c, "rate": r} for c, r in peer_runs.grid],
                "ratio": ratio,
            }
        figures[str(concurrency)] = entry
    result.figures.update(
        jobs=args.jobs, rounds=args.rounds, concurrencies=args.concurrency, by_concurrency=figures
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--python", default=".venv-peers/bin/python", help="the peers' interpreter")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=parse_ints, default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--peers",
        type=lambda text: [name for name in text.split(",") if name],
        default=list(PEERS),
    )
    args = parser.parse_args()
    unknown = [name for name in args.peers if name not in PEERS]
    if unknown:
        parser.error(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    result = asyncio.run(main_async(args))
    result.print_table()
    result.save()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
