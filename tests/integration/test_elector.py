"""Leader election with several electors in one process, against a real Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import asyncpg
import pytest

from dispatcher.core.metrics import Metrics
from dispatcher.core.queries import queries_for
from dispatcher.core.schema import SchemaNames
from dispatcher.services.elector import ElectionTiming, Elector, Role
from dispatcher.services.notifier import Notifier
from dispatcher.services.replicas import ReplicaRegistry, incarnation_id
from tests.support.database import TestDatabase, register_owner
from tests.support.waiting import eventually


class CountingElector(Elector):
    """An elector that counts its steps (elections tried, leases renewed), so a test
    can wait for the next one instead of sleeping through it."""

    steps = 0

    async def run_once(self) -> None:
        await super().run_once()
        self.steps += 1


class Replica:
    """An elector with its own notifier, as one replica process would hold them."""

    def __init__(
        self, db: TestDatabase, name: str, terms: list[int], timing: ElectionTiming
    ) -> None:
        self.name = name
        self.metrics = Metrics()
        self.notifier = Notifier(db.dsn)
        self.elector = CountingElector(
            self.notifier,
            db.schema,
            incarnation_id(name),
            timing=timing,
            on_elected=self._elected,
            on_deposed=self._deposed,
            metrics=self.metrics,
        )
        self.terms = terms
        self.deposed_reasons: list[str] = []
        self.task: asyncio.Task[None] | None = None
        self.running = False

    async def _elected(self, term: int) -> None:
        self.terms.append(term)

    async def _deposed(self, reason: str) -> None:
        self.deposed_reasons.append(reason)

    def start(self) -> None:
        self.notifier.start()
        self.task = asyncio.create_task(self.elector.run())
        self.running = True

    def believes_leader(self) -> bool:
        return self.running and self.elector.is_leader()

    async def release(self) -> None:
        self.running = False
        await self.elector.release()
        await self._cancel()
        await self.notifier.close()

    async def crash(self) -> None:
        """Vanish without a word: the server notices the dropped session."""
        self.running = False
        conn = self.notifier.current()
        await self._cancel()
        if conn is not None:
            conn.terminate()
        await self.notifier.close()

    async def _cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def backend_pid(self) -> int | None:
        conn = self.notifier.current()
        return conn.get_server_pid() if conn is not None else None


FAST = ElectionTiming(election_interval=0.5, heartbeat_interval=0.2, lease=2.0)


async def leader_row(conn: asyncpg.Connection, schema: str) -> asyncpg.Record:
    return await conn.fetchrow(queries_for(schema)["leader_current"])


async def test_one_elector_becomes_leader_and_renews(db: TestDatabase) -> None:
    terms: list[int] = []
    replica = Replica(db, "solo", terms, FAST)
    replica.start()
    admin = await db.connect()
    try:
        await eventually(
            lambda: asyncio.sleep(0, replica.believes_leader()), timeout=5, what="leadership"
        )
        first = await leader_row(admin, db.schema)
        assert first["holder"] == replica.elector.owner_id
        assert first["backend_pid"] == replica.backend_pid()
        assert first["term"] == terms[0]

        async def renewed() -> bool:
            row = await leader_row(admin, db.schema)
            return bool(row["renewed_at"] > first["renewed_at"])

        await eventually(renewed, timeout=5, what="a lease renewal")
        assert (await leader_row(admin, db.schema))["term"] == first["term"]
        registry = replica.metrics.registry
        assert registry.get_sample_value("dispatcher_is_leader") == 1
        assert registry.get_sample_value("dispatcher_leader_term") == first["term"]
    finally:
        await replica.release()
        await admin.close()
    assert replica.deposed_reasons == ["released"]
    registry = replica.metrics.registry
    assert registry.get_sample_value("dispatcher_is_leader") == 0
    for event in ("elected", "deposed"):
        value = registry.get_sample_value("dispatcher_leader_transitions_total", {"event": event})
        assert value == 1, event


async def test_exactly_one_leader_through_20s_of_random_stops_and_starts(
    db: TestDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(20261122)
    terms: list[int] = []
    replicas = [Replica(db, f"r{i}", terms, FAST) for i in range(3)]
    for replica in replicas:
        replica.start()
    admin = await db.connect()
    samples = 0
    leaderless_since: float | None = None
    longest_gap = 0.0
    actions: dict[str, int] = {}
    stop_sampling = asyncio.Event()

    lock_holder_sql = (
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
        "AND classid = ((hashtextextended($1, 0) >> 32) & 4294967295)::oid "
        "AND objid = (hashtextextended($1, 0) & 4294967295)::oid"
    )
    lock_name = SchemaNames(db.schema).leader_lock_name
    # A believer whose session was just killed may believe for the instant it takes
    # its connection to report the loss; it must never do so while another holds the
    # lock for longer than that.
    lockless_since: dict[str, float] = {}
    overlaps = 0

    async def sample() -> None:
        nonlocal samples, leaderless_since, longest_gap, overlaps
        while not stop_sampling.is_set():
            believers = [r for r in replicas if r.believes_leader()]
            samples += 1
            now = time.monotonic()
            if len(believers) > 1:
                overlaps += 1
                holder = await sampler_conn.fetchval(lock_holder_sql, lock_name)
                with_lock = [r.name for r in believers if r.backend_pid() == holder]
                assert len(with_lock) <= 1, f"two leaders hold the lock: {with_lock}"
                for r in believers:
                    if r.backend_pid() != holder and r.believes_leader():
                        since = lockless_since.setdefault(r.elector.owner_id, now)
                        assert now - since < 1.0, f"{r.name} believes it leads without the lock"
            if believers or not any(r.running for r in replicas):
                if leaderless_since is not None:
                    longest_gap = max(longest_gap, now - leaderless_since)
                leaderless_since = None
            elif leaderless_since is None:
                leaderless_since = now
            if len(believers) == 1 and samples % 5 == 0:
                believer = believers[0]
                term = believer.elector.term
                row = await leader_row(sampler_conn, db.schema)
                if row["term"] == term and believer.believes_leader():
                    assert row["holder"] == believer.elector.owner_id, (row, believer.name)
                    assert row["lease_current"], row
            await asyncio.sleep(0.02)  # the sampling rate, not a wait for anything

    sampler_conn = await db.connect()  # the loop below uses `admin` meanwhile
    sampler = asyncio.create_task(sample())
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            # The pace of the injected churn (a fault schedule), not a wait: the
            # sampler checks the invariants throughout.
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            index = rng.randrange(len(replicas))
            replica = replicas[index]
            if not replica.running:
                replicas[index] = Replica(db, replica.name, terms, FAST)
                replicas[index].start()
                action = "start"
            else:
                action = rng.choice(["release", "crash", "kill_session"])
                if action == "release":
                    await replica.release()
                elif action == "crash":
                    await replica.crash()
                else:
                    pid = replica.backend_pid()
                    if pid is not None:
                        await admin.execute("SELECT pg_terminate_backend($1)", pid)
            actions[action] = actions.get(action, 0) + 1
            assert not sampler.done(), sampler.exception()
    finally:
        stop_sampling.set()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        for replica in replicas:
            if replica.running:
                await replica.release()
        await admin.close()
        await sampler_conn.close()

    with capsys.disabled():
        print(
            f"\n  election churn: {samples} samples, actions {actions}, "
            f"{len(terms)} terms, longest leaderless gap {longest_gap * 1000:.0f} ms, "
            f"{overlaps} samples with a dying leader still believing"
        )
    assert terms == sorted(set(terms)), f"terms not strictly increasing: {terms}"
    assert len(terms) >= 3, terms
    assert longest_gap < FAST.lease + 1.0


async def test_a_renewal_that_finds_another_leader_deposes_at_once(db: TestDatabase) -> None:
    terms: list[int] = []
    replica = Replica(db, "victim", terms, FAST)
    replica.start()
    admin = await db.connect()
    try:
        await eventually(
            lambda: asyncio.sleep(0, replica.believes_leader()), timeout=5, what="leadership"
        )
        # Someone bumps the term behind its back (as a takeover would).
        await admin.execute(f'UPDATE "{db.schema}".leader SET term = term + 100')
        await eventually(
            lambda: asyncio.sleep(0, bool(replica.deposed_reasons)), timeout=5, what="deposition"
        )
        assert replica.deposed_reasons[0] == "lease taken over by another replica"
        # It dropped its session (and so the lock) and wins a fresh, higher term.
        await eventually(lambda: asyncio.sleep(0, len(terms) == 2), timeout=5, what="re-election")
        assert terms[1] > terms[0] + 100
    finally:
        await replica.release()
        await admin.close()


async def test_hung_leader_is_terminated_after_its_lease(db: TestDatabase) -> None:
    """A leader whose loop stops (but whose session stays open) is taken over."""
    terms: list[int] = []
    hung = Replica(db, "hung", terms, FAST)
    hung.start()
    await eventually(lambda: asyncio.sleep(0, hung.believes_leader()), timeout=5, what="leader")
    assert hung.task is not None
    hung.task.cancel()  # its loop is gone; the session and the lock are not
    hung_pid = hung.backend_pid()
    standby = Replica(db, "standby", terms, FAST)
    standby.start()
    started = time.monotonic()
    try:
        await eventually(
            lambda: asyncio.sleep(0, standby.believes_leader()),
            timeout=FAST.lease + 3,
            what="takeover of the hung leader",
        )
        took = time.monotonic() - started
        assert took >= FAST.lease - 0.5, f"took over after {took:.2f}s, before the lease lapsed"
        admin = await asyncpg.connect(standby.notifier._dsn)
        try:
            gone = await admin.fetchval(
                "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $1", hung_pid
            )
        finally:
            await admin.close()
        assert gone, "the hung leader's backend should have been terminated"
    finally:
        await standby.release()
        await hung.crash()


async def test_release_hands_over_within_milliseconds(
    db: TestDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    terms: list[int] = []
    timing = ElectionTiming(election_interval=5.0, heartbeat_interval=1.0, lease=10.0)
    first = Replica(db, "first", terms, timing)
    first.start()
    await eventually(lambda: asyncio.sleep(0, first.believes_leader()), timeout=5, what="leader")
    second = Replica(db, "second", terms, timing)
    second.start()
    # The standby's first try (at its start) fails; its next is 5 s away. Only a
    # takeover well before that shows that the NOTIFY, not the timer, woke it.
    await eventually(
        lambda: asyncio.sleep(0, second.notifier.connected and second.elector.steps >= 1),
        timeout=5,
        what="the standby connected, and its first (failed) election attempt",
    )
    assert not second.believes_leader()
    released = time.monotonic()
    await first.release()
    # The standby only tries every 5 s; the NOTIFY is what makes it take over.
    await eventually(
        lambda: asyncio.sleep(0, second.believes_leader()),
        timeout=2,
        what="takeover on the leader channel",
        every=0.001,
    )
    handover = time.monotonic() - released
    with capsys.disabled():
        print(f"\n  graceful handover (in-process): {handover * 1000:.1f} ms")
    await second.release()
    assert handover < 0.5


async def test_a_release_during_a_renewal_waits_for_it_then_ends_the_lease(
    db: TestDatabase,
) -> None:
    """SIGTERM can come while the lease renewal is on the wire: the release must not
    send its statement on the same connection meanwhile (asyncpg refuses: "another
    operation is in progress", and the lease stayed current for a dead holder)."""
    terms: list[int] = []
    timing = ElectionTiming(election_interval=0.5, heartbeat_interval=0.2, lease=10.0)
    leader = Replica(db, "leader", terms, timing)
    leader.start()
    await eventually(lambda: asyncio.sleep(0, leader.believes_leader()), timeout=5, what="leader")
    pid = leader.backend_pid()
    blocker = await db.connect()
    admin = await db.connect()
    try:
        async with blocker.transaction():
            await blocker.execute(f"SELECT * FROM {db.schema}.leader FOR UPDATE")

            async def renewal_blocked() -> bool:
                waiting = await admin.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
                )
                return bool(waiting)

            await eventually(renewal_blocked, timeout=5, what="the renewal waiting on our lock")
            release = asyncio.create_task(leader.release())
            # The release waits for the renewal rather than failing beside it.
            await asyncio.sleep(0)
            assert not release.done()
        await asyncio.wait_for(release, timeout=10)
        row = await leader_row(admin, db.schema)
        assert row["term"] == terms[0]
        assert not row["lease_current"], "the release did not end the lease"
        assert leader.deposed_reasons == ["released"]
    finally:
        await blocker.close()
        await admin.close()


async def test_replica_registry_heartbeats_and_the_leader_prunes(db: TestDatabase) -> None:
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=2)
    leading = False
    registry = ReplicaRegistry(
        pool,
        db.schema,
        owner_id=incarnation_id("pod-a"),
        name="pod-a",
        version="test",
        role=lambda: "leader" if leading else "standby",
        job_types=["demo.noop"],
        is_leader=lambda: leading,
        interval=1.0,
        prune_after=60.0,
        metrics=Metrics(),
    )
    try:
        async with pool.acquire() as conn:
            await conn.execute(
                f'INSERT INTO "{db.schema}".replicas (id, name, host, pid, version, last_seen) '
                "VALUES ('old-1-abc', 'old', 'h', 1, 'v', now() - interval '1 hour')"
            )
        assert await registry.run_once() == []  # a standby never prunes
        leading = True
        assert await registry.run_once() == ["old-1-abc"]
        async with pool.acquire() as conn:
            rows = await conn.fetch(queries_for(db.schema)["replicas_list"], 30.0)
        assert [(r["name"], r["role"], r["alive"], r["job_types"]) for r in rows] == [
            ("pod-a", "leader", True, ["demo.noop"])
        ]
        await registry.remove()
        async with pool.acquire() as conn:
            assert await conn.fetchval(f'SELECT count(*) FROM "{db.schema}".replicas') == 0
    finally:
        await pool.close()


def test_incarnation_ids_are_new_at_every_start() -> None:
    a, b = incarnation_id("pod-1"), incarnation_id("pod-1")
    assert a != b and a.startswith("pod-1-") and b.startswith("pod-1-")


async def test_stale_term_claims_and_stale_attempt_completions_are_refused(
    db: TestDatabase,
) -> None:
    """Fencing, tested directly on the SQL."""
    q = queries_for(db.schema)
    names = SchemaNames(db.schema)
    conn = await db.connect()
    try:
        jobs = f'"{db.schema}".jobs'
        await conn.execute(f"INSERT INTO {jobs} (type) SELECT 'fenced' FROM generate_series(1, 3)")
        old = await conn.fetchrow(q["leader_try_elect"], names.leader_lock_name, "old-leader", 10.0)
        for owner in ("old-leader", "new"):
            await register_owner(conn, db.schema, owner)
        claim_args = (["fenced"], [1], 1, [5], [None], 1, [None], [None], [None])
        claimed = await conn.fetch(q["claim_jobs"], old["term"], "old-leader", *claim_args)
        assert len(claimed) == 1 and claimed[0]["attempts"] == 1
        job_id = claimed[0]["id"]

        # A new leader takes over (term + 1): the old term claims nothing any more.
        await conn.execute(f'UPDATE "{db.schema}".leader SET term = term + 1, holder = $1', "new")
        assert await conn.fetch(q["claim_jobs"], old["term"], "old-leader", *claim_args) == []
        # ...not even with the new term under the old name.
        assert await conn.fetch(q["claim_jobs"], old["term"] + 1, "old-leader", *claim_args) == []

        # The job is rescued and claimed again by the new leader: attempt 2, owner "new".
        await conn.execute(f"UPDATE {jobs} SET status = 'pending' WHERE id = $1", job_id)
        await conn.execute(f"UPDATE {jobs} SET status = 'completed' WHERE id <> $1", job_id)
        again = await conn.fetch(q["claim_jobs"], old["term"] + 1, "new", *claim_args)
        assert [(r["id"], r["attempts"]) for r in again] == [(job_id, 2)]

        def outcome(owner: str, attempt: int) -> tuple[object, ...]:
            return (owner, [job_id], [attempt], ["completed"], ['"late"'], [None], [None], [0.0],
                    "1s")  # fmt: skip

        # The old owner's late result for attempt 1 is fenced off...
        assert await conn.fetch(q["complete_jobs"], *outcome("old-leader", 1)) == []
        # ...as is a result claiming the new attempt under the old owner.
        assert await conn.fetch(q["complete_jobs"], *outcome("old-leader", 2)) == []
        row = await conn.fetchrow(f"SELECT status, result FROM {jobs} WHERE id = $1", job_id)
        assert (row["status"], row["result"]) == ("processing", None)
        # The owning attempt's result is stored.
        done = await conn.fetch(q["complete_jobs"], *outcome("new", 2))
        assert [(r["id"], r["status"]) for r in done] == [(job_id, "completed")]
    finally:
        await conn.close()


async def test_a_claim_racing_an_election_is_fenced(db: TestDatabase) -> None:
    """The claim share-locks the leader row: an election waits for it, then sees its
    jobs as processing; a claim after the election claims nothing."""
    q = queries_for(db.schema)
    names = SchemaNames(db.schema)
    claimer = await db.connect()
    elector = await db.connect()
    try:
        await claimer.execute(f"INSERT INTO \"{db.schema}\".jobs (type) VALUES ('t'), ('t')")
        term = (await claimer.fetchrow(q["leader_try_elect"], names.leader_lock_name, "a", 10.0))[
            "term"
        ]
        await claimer.execute(q["leader_release"], term, "a", names.leader_lock_name, "x")
        await register_owner(claimer, db.schema, "a")
        tx = claimer.transaction()
        await tx.start()
        claim_args = (["t"], [1], 1, [3], [None])
        claimed = await claimer.fetch(
            q["claim_jobs"], term, "a", *claim_args, 1, [None], [None], [None]
        )
        assert len(claimed) == 1
        election = asyncio.create_task(
            elector.fetchrow(q["leader_try_elect"], names.leader_lock_name, "b", 10.0)
        )
        # The election's statement queues behind the claim's share lock on the
        # leader row: wait until the server shows the claim blocking it.
        pids = (elector.get_server_pid(), claimer.get_server_pid())

        async def election_blocked_by_the_claim() -> bool:
            return bool(await claimer.fetchval("SELECT $2 = ANY(pg_blocking_pids($1))", *pids))

        await eventually(
            election_blocked_by_the_claim, timeout=5, what="the election to wait for the claim"
        )
        assert not election.done(), "the election must wait for the in-flight claim"
        await tx.commit()
        new = await asyncio.wait_for(election, 5)
        assert new["term"] == term + 1
        assert (
            await claimer.fetch(q["claim_jobs"], term, "a", *claim_args, 2, [None], [None], [None])
            == []
        )
        assert Role.LEADER.value == "leader"
    finally:
        await claimer.close()
        await elector.close()


@pytest.mark.timeout(20)  # the bug spun the event loop: only the signal could end it
async def test_asking_for_the_connection_just_after_it_closed_waits_for_the_next(
    db: TestDatabase,
) -> None:
    # asyncpg runs termination callbacks on the next loop iteration. Asked in between,
    # the notifier once saw its "connected" event still set but the connection closed,
    # and looped on the two without ever yielding.
    notifier = Notifier(db.dsn, backoff_base=0.01)
    notifier.start()
    try:
        first = await notifier.connection(timeout=10)
        first.terminate()  # as a server-side close would: the callback is still queued
        second = await notifier.connection(timeout=10)
        assert second is not first and not second.is_closed()
    finally:
        await notifier.close()
