"""``make bench``: every benchmark in turn, each printing its table and appending a JSON
line to bench/results/. ``--long`` uses the larger sizes (``make bench-long``).

    python -m bench.run_all [--long] [--only burndown,latency]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS = {
    "raw_sql": [],
    "burndown": [],
    "latency": [],
    "bulk_enqueue": [],
    "failover": [],
    "table_growth": [],
    "memory": [],
    "heartbeat_hot": [],
    "dashboard": [],
    "keyed_claim": [],
    "dependencies": [],
}
LONG = {"burndown": ["--jobs", "200000"], "raw_sql": ["--jobs", "200000"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--long", action="store_true")
    parser.add_argument("--only", help="comma-separated benchmark names")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    failed = []
    for name in names:
        extra = LONG.get(name, []) if args.long else BENCHMARKS[name]
        print(f"\n=== bench.{name} {' '.join(extra)}", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, "-m", f"bench.{name}", *extra])
        print(f"=== bench.{name} took {time.monotonic() - started:.0f} s (exit {code})", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
