"""A/B of the replica's code: burn-downs by two (or more) revisions, alternating.

Throughput alone moves by ±20% from one minute to the next on this shared machine,
so a change to the replica's hot path is judged by paired rounds and by the CPU each
job cost: the replica's own (``/proc/<pid>/stat``) and the whole machine's busy time
(``/proc/stat``: the database's work and the replica's together), both from the first
job started to the end. Each revision is checked out into a temporary git worktree
(``.`` is the working tree as it is) and its replica runs there (``python -m`` imports
the ``dispatcher`` package of its working folder first); every round drains the same
number of ``demo.noop`` jobs on the same database, the revisions in alternating order,
and the medians are compared. The schema is migrated by the code running this script,
so revisions must share the migrations. Linux only (``/proc``).

    python -m bench.ab [--revisions HEAD~1,.] [--concurrency 100] [--jobs 30000]
                       [--rounds 6] [--env 'DISPATCHER_CLAIM_BATCH=50;']

``--env`` gives each revision, in order, extra settings for its replica (``;``
between revisions, ``,`` between settings): ``--revisions .,. --env ';X=1'`` compares
one checkout with and without a setting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.burndown import BurnDown, burn_down
from bench.common import Result, database

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Variant:
    """One side of the comparison: a checkout and the settings its replica gets."""

    revision: str
    env: dict[str, str]
    path: Path = ROOT
    runs: list[BurnDown] = field(default_factory=list)

    @property
    def label(self) -> str:
        settings = ",".join(f"{k}={v}" for k, v in self.env.items())
        return f"{self.revision} {settings}".strip()

    def medians(self) -> tuple[float, float, float]:
        """Over the rounds: jobs/s, replica and machine CPU µs per job."""
        return (
            statistics.median(run.rate for run in self.runs),
            statistics.median(run.replica_us_per_job for run in self.runs),
            statistics.median(run.machine_us_per_job for run in self.runs),
        )


def parse_env(text: str, count: int) -> list[dict[str, str]]:
    """``--env``: per revision, ``k=v`` pairs; missing trailing entries are empty."""
    parts = text.split(";") if text else []
    if len(parts) > count:
        raise SystemExit(f"--env names {len(parts)} revisions' settings, there are {count}")
    envs: list[dict[str, str]] = []
    for part in parts + [""] * (count - len(parts)):
        env: dict[str, str] = {}
        for pair in filter(None, part.split(",")):
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise SystemExit(f"--env: {pair!r} is not NAME=value")
            env[key.strip()] = value
        envs.append(env)
    return envs


@contextlib.contextmanager
def checkouts(variants: list[Variant]) -> Iterator[None]:
    """Each variant's revision in a worktree of its own (``.``: this working tree),
    removed afterwards."""
    made: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="dispatcher-ab-") as home:
        try:
            for i, variant in enumerate(variants):
                if variant.revision == ".":
                    continue
                path = Path(home) / f"{i}"
                print(f"checking out {variant.revision} into {path}", file=sys.stderr, flush=True)
                added = subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet",
                     str(path), variant.revision],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                if added.returncode != 0:
                    raise SystemExit(
                        f"cannot check out {variant.revision!r}: {added.stderr.strip()}"
                    )
                made.append(path)
                variant.path = path
            yield
        finally:
            # While the folder still exists, so git forgets each worktree it removes.
            for path in made:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                    check=False,
                )


async def main_async(args: argparse.Namespace) -> Result:
    revisions = [r.strip() for r in args.revisions.split(",") if r.strip()]
    if len(revisions) < 2:
        raise SystemExit("--revisions needs at least two (the same one twice is fine)")
    variants = [
        Variant(revision, env)
        for revision, env in zip(revisions, parse_env(args.env, len(revisions)), strict=True)
    ]
    result = Result("ab")
    with checkouts(variants), database() as db:
        for round_ in range(args.rounds):
            order = variants if round_ % 2 == 0 else variants[::-1]
            for variant in order:
                await db.reset()
                run = await burn_down(
                    db, args.jobs, args.concurrency, env=variant.env, cwd=variant.path
                )
                variant.runs.append(run)
                print(
                    f"round {round_ + 1}/{args.rounds} {variant.label}: {run.rate:,.0f} jobs/s, "
                    f"replica {run.replica_us_per_job:.1f} µs/job, "
                    f"machine {run.machine_us_per_job:.1f} µs/job",
                    file=sys.stderr,
                    flush=True,
                )
        await db.drop()
    first = variants[0].medians()[0]
    figures = []
    for variant in variants:
        rate, replica, machine = variant.medians()
        figures.append(
            {"revision": variant.revision, "env": variant.env, "rate": rate,
             "rates": [run.rate for run in variant.runs], "replica_us_per_job": replica,
             "machine_us_per_job": machine}
        )  # fmt: skip
        result.add(
            f"{variant.label}, median of {args.rounds}",
            f"{rate:,.0f} jobs/s ({rate / first:.0%} of the first), "
            f"replica {replica:.1f} µs/job, machine {machine:.1f} µs/job",
        )
    result.add(
        "setting",
        f"{args.jobs:,} no-ops, concurrency {args.concurrency}",
        jobs=args.jobs,
        concurrency=args.concurrency,
        variants=figures,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--revisions", default="HEAD~1,.")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--env", default="", help="per revision: NAME=value,...;NAME=value")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    result.print_table()
    result.save()


if __name__ == "__main__":
    main()
