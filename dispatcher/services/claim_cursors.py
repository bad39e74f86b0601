"""Where each type's next claim starts its scan of the claim index.

A snapshot held elsewhere (a long transaction, a forgotten ``BEGIN`` in psql, a
replication slot) keeps vacuum from cleaning up the index entries of jobs claimed since
it began, and a scan from the start of a type's pending jobs walks them all, each
claim, again: at 2,000 jobs/s that is 120,000 dead entries a minute. So each claim
starts where the type's last claim stopped:

* ``hint``: the best priority the type's last claim took. The claim's priority probe
  starts there (any hint is correct: a better priority with pending jobs is still
  found first).
* ``since``: at that priority, the (``run_at``, id) of the last job the last claim
  took; the next scan starts after it. Every due job before it that the claim could
  see was claimed then (the scan goes in run_at, id order), unless another session
  held its row locked (the id matters: the jobs of one COPY share their run_at). A
  row can land behind it later: a row of a transaction that committed after the
  claim (``run_at`` defaults to its transaction's start), a row given a past
  ``run_at``. Its insert NOTIFY,
  delivered at commit, carries the earliest ``run_at`` per type (migration 0009), and
  a type named with one before its ``since`` is scanned from the start; a claim in
  flight when that news came does not set the ``since`` again. Rows handed back come
  with a wake-up that scans every type from the start, like the poll tick: a row
  behind ``since`` (a locked one, a row some UPDATE made pending again) waits at most
  one poll interval.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from typing import Any

# Half a microsecond (timestamps' resolution): in float epoch seconds, a notified
# run_at equal to a since's may differ from it by about 2e-7 either way.
_SLACK = 5e-7
# Wake-ups that keep the cursors; any other (the poll tick, a reconnect that may have
# lost notifications, rows handed back, a new term) scans every type from the start.
KEEP_CURSORS_ON = frozenset({"notify", "slot", "retry", "timer", "session", "rescue", "control"})


class ClaimCursors:
    """Per type: the priority hint and the ``since`` of its next claim."""

    def __init__(self) -> None:
        self._hints: dict[str, int] = {}
        self._since: dict[str, tuple[dt.datetime, int]] = {}
        # Bumped whenever a since is forgotten, so a claim sent before cannot set it
        # again from rows read before the late row was committed.
        self.generation = 0

    def hint(self, type_: str) -> int | None:
        return self._hints.get(type_)

    def since(self, type_: str) -> tuple[dt.datetime, int] | None:
        """(run_at, id) after which the next scan of the hint's priority starts."""
        return self._since.get(type_)

    def claimed(self, rows: Iterable[Mapping[str, Any]], generation: int) -> None:
        """Record a claim's rows (sent at ``generation``): per type, its best priority,
        and where the next scan of that priority starts."""
        best: dict[str, tuple[int, tuple[dt.datetime, int]]] = {}
        for row in rows:
            type_, priority, at = row["type"], row["priority"], (row["run_at"], row["id"])
            known = best.get(type_)
            if known is None or priority < known[0] or (priority == known[0] and at > known[1]):
                best[type_] = (priority, at)
        for type_, (priority, at) in best.items():
            self._hints[type_] = priority
            if generation == self.generation:
                self._since[type_] = at
            else:
                self._since.pop(type_, None)

    def forget(self, types: Iterable[str] | None = None) -> None:
        """Scan ``types`` (None: all) from the start at their next claim."""
        self.generation += 1
        if types is None:
            self._since.clear()
        else:
            for type_ in types:
                self._since.pop(type_, None)

    def woken(self, sources: Iterable[str]) -> None:
        """The claim loop woke for ``sources``: most wake-ups scan from the start."""
        if not KEEP_CURSORS_ON.issuperset(sources):
            self.forget()

    def heard(self, payload: str) -> None:
        """An insert notification's payload: per type, the earliest run_at inserted
        (epoch seconds), or '*' (too many types to name). Types whose row lands before
        their ``since`` are scanned from the start. Anyone may NOTIFY on our channel,
        so anything else forgets every type: a hint, never an order."""
        try:
            inserted = json.loads(payload)
        except ValueError:
            inserted = None
        if not isinstance(inserted, dict):
            self.forget()
            return
        behind = []
        for type_, first in inserted.items():
            since = self._since.get(type_)
            if since is None:
                continue
            # At its run_at, a row with a lower id would be behind it too.
            if not isinstance(first, int | float) or first < since[0].timestamp() + _SLACK:
                behind.append(type_)
        if behind:
            self.forget(behind)
