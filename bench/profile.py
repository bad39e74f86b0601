"""Sampling profiles of a replica process with py-spy, summarised as text.

``python -m bench.burndown --profile FILE`` attaches py-spy to the replica while it
drains the jobs and writes py-spy's raw (collapsed-stack) output to FILE; the summary
printed after the table is where the replica's samples were: the functions that were
on top of the stack most often (self), and the dispatcher functions that were on the
stack most often (inclusive). ``python -m bench.profile FILE`` prints it again.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# "function (path/to/file.py:123)"; idle frames carry no file.
FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


class Profiler:
    """py-spy recording one process until it exits; stop() waits for the file."""

    def __init__(self, pid: int, output: Path, rate: int = 250) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(spy).exists():
            raise RuntimeError("--profile needs py-spy: pip install py-spy (in the dev extra)")
        self.output = output
        self.process = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
             "--nonblocking", "--output", str(output)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    def stop(self, timeout: float = 30) -> None:
        """Wait until the profiled process has exited and py-spy wrote its file."""
        _, errors = self.process.communicate(timeout=timeout)
        if self.process.returncode != 0 or not self.output.exists():
            raise RuntimeError(f"py-spy failed ({self.process.returncode}): {errors.strip()}")


def short(frame: str) -> str:
    """``function (module/file.py)`` with the path cut down to the package and file."""
    match = FRAME.match(frame)
    if match is None:
        return frame
    parts = Path(match["file"]).parts
    where = "/".join(parts[-2:]) if len(parts) > 1 else match["file"]
    if "dispatcher" in parts:  # our own code, however deep: from the package down
        where = "/".join(parts[len(parts) - 1 - parts[::-1].index("dispatcher") :])
    else:
        for marker in ("site-packages", "lib"):
            if marker in parts:
                where = "/".join(parts[parts.index(marker) + 1 :][:2])
                break
    return f"{match['function']} ({where})"


def summarize(raw: Path, top: int = 12) -> str:
    """Self and inclusive sample shares from py-spy's raw output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [short(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            if "(dispatcher/" in frame:
                inclusive[frame] += count
    if total == 0:
        return f"no samples in {raw}"
    lines = [f"\nprofile: {total:,} samples from {raw}", "", "self (on top of the stack):"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "inclusive, dispatcher code (on the stack):"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("raw", type=Path)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    print(summarize(args.raw, args.top))


if __name__ == "__main__":
    main()
