"""The batch writer: one transaction stores or quarantines every message of a batch.

COPY into per-connection staging tables, then set-based inserts: the ledger decides which
messages are new (``ON CONFLICT (msg_id) DO NOTHING``), readings and events follow, the latest
state per pump moves forward only, sequence gaps are updated, and a NOTIFY tells the alert
service which pumps changed. If the database refuses the data of one message, the batch is split
until that message is found and quarantined (``store_error``); the rest are stored.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.domain import sequence
from services.domain.contract import Reason, Telemetry
from services.ingest import sql
from services.ingest.backlog import Incoming
from services.ingest.judge import Accepted, Judged, Quarantined, Rules, judge, quarantine_rows
from services.ingest.metrics import IngestMetrics
from services.logs import get
from services.storage import channels
from services.storage.database import DATABASE_ERRORS, Connection

log = get(__name__)

_JUDGE_SLICE = 64


class StoreUnavailable(Exception):
    """The database failed for a reason unrelated to the data; retry the batch later."""


@dataclass(slots=True)
class Outcome:
    stored: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    gaps_opened: int = 0
    missing: int = 0
    late_filled: int = 0
    recovered: list[Recovered] = field(default_factory=list)
    """Gaps wholly filled (their last piece closed) by this batch."""


@dataclass(frozen=True, slots=True)
class Recovered:
    age_s: float
    """From the gap's detection to the commit that filled it."""
    requested: bool
    """Whether a resend had been asked for it (else the messages were only late)."""


@dataclass(frozen=True, slots=True)
class WriterConfig:
    topic_prefix: str = ""
    max_future: timedelta = timedelta(minutes=5)
    oldest_recorded_at: datetime = datetime(2000, 1, 1, tzinfo=UTC)
    retention: timedelta | None = None
    live_window_s: float = 600.0
    gap_settle_s: float = 5.0
    """A new gap is first asked for (backfill) once it has stood this long."""


async def prepare_connection(conn: asyncpg.Connection) -> None:
    """Pool ``init``: the staging tables live as long as the connection."""
    await conn.execute(sql.CREATE_STAGING)


@dataclass(slots=True)
class Prepared:
    """A judged batch, ready to store (and to store again after a failed attempt)."""

    batch: list[Incoming]
    judged: Judged


class BatchWriter:
    def __init__(self, pool: asyncpg.Pool, config: WriterConfig, metrics: IngestMetrics) -> None:
        self.pool = pool
        self.config = config
        self.metrics = metrics
        # Pumps and partitions are never deleted while ingest runs (retention clears the
        # partition cache), so what is known to exist stays so.
        self._months: set[tuple[int, int]] = set()
        self._pumps: set[str] = set()
        self.on_gaps_opened: Callable[[], None] | None = None
        """Called after a commit that opened gaps (wakes the backfill worker)."""

    def rules(self, now: datetime) -> Rules:
        oldest = self.config.oldest_recorded_at
        if self.config.retention is not None:
            oldest = max(oldest, now - self.config.retention)
        return Rules(self.config.topic_prefix, self.config.max_future, oldest)

    async def prepare(self, batch: list[Incoming]) -> Prepared:
        """Judge every message. CPU only; it overlaps with the previous batch's commit and
        yields to the event loop now and then so database replies are not kept waiting."""
        now = datetime.now(UTC)
        rules = self.rules(now)
        judged = Judged()
        for start in range(0, len(batch), _JUDGE_SLICE):
            judge(batch[start : start + _JUDGE_SLICE], rules, now, into=judged)
            await asyncio.sleep(0)
        return Prepared(batch, judged)

    async def store(self, prepared: Prepared) -> Outcome:
        """Store or quarantine every message of the batch; raise StoreUnavailable to retry."""
        judged = prepared.judged
        outcome = Outcome(duplicates=len(judged.duplicates_in_batch))
        try:
            await self._ensure_partitions(judged)
            await self._store(judged, outcome)
        except StoreUnavailable:
            raise
        except DATABASE_ERRORS as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        self.metrics.duplicates.inc(len(judged.duplicates_in_batch))
        return outcome

    # -- partitions ------------------------------------------------------------------------

    async def _ensure_partitions(self, judged: Judged) -> None:
        months = {
            (utc.year, utc.month)
            for a in judged.accepted
            if isinstance(a.message, Telemetry)
            for utc in (a.message.recorded_at.astimezone(UTC),)
        }
        for year, month in sorted(months - self._months):
            created = await self.pool.fetchval(
                sql.ENSURE_PARTITION, datetime(year, month, 1, tzinfo=UTC)
            )
            if created:
                self.metrics.partitions_created.inc()
                log.info("partition_created", month=f"{year:04d}-{month:02d}")
            self._months.add((year, month))

    async def maintain(self, months_ahead: int) -> None:
        """Create partitions ahead; apply retention (drop old partitions, prune the ledger)."""
        created = await self.pool.fetchval(sql.ENSURE_PARTITIONS_AHEAD, months_ahead)
        if created:
            self.metrics.partitions_created.inc(created)
            log.info("partitions_created_ahead", count=created)
        if self.config.retention is not None:
            cutoff = datetime.now(UTC) - self.config.retention
            async with self.pool.acquire() as conn, conn.transaction():
                dropped = [r[0] for r in await conn.fetch(sql.DROP_PARTITIONS_BEFORE, cutoff)]
                # Ids stay a day longer than their readings: a re-send of a message whose
                # reading is kept must still be recognised (recorded_at ≤ received_at + 5 min).
                pruned = await conn.execute(sql.PRUNE_LEDGER, cutoff - timedelta(days=1))
            if dropped:
                log.info("partitions_dropped", partitions=dropped, ledger=pruned)
                self._months.clear()

    async def count_open_gaps(self) -> None:
        row = await self.pool.fetchrow(sql.COUNT_OPEN_GAPS)
        assert row is not None
        self.metrics.gaps_open.set(row["gaps"])
        self.metrics.missing_open.set(row["missing"])
        self.metrics.gaps_unrecoverable.set(row["unrecoverable"])
        self.metrics.missing_unrecoverable.set(row["unrecoverable_missing"])

    # -- storing ---------------------------------------------------------------------------

    async def _store(self, judged: Judged, outcome: Outcome) -> None:
        try:
            await self._commit(judged, outcome)
        except Exception as exc:
            if not _is_data_error(exc):
                raise
            if len(judged) > 1:
                first, second = judged.split()
                await self._store(first, outcome)
                await self._store(second, outcome)
                return
            await self._store_refused(judged, exc, outcome)

    async def _store_refused(self, judged: Judged, exc: Exception, outcome: Outcome) -> None:
        """One message the database refused: quarantine it with the database's words."""
        if judged.accepted:
            accepted = judged.accepted[0]
            log.warning("store_refused", topic=accepted.incoming.topic, error=str(exc))
            refused = Quarantined(
                accepted.incoming,
                Reason.STORE_ERROR,
                f"the database refused the message: {type(exc).__name__}: {exc}",
            )
            await self._commit(Judged(quarantined=[refused]), outcome)
            return
        # The quarantine row itself was refused: keep the bytes under a neutral topic.
        held = judged.quarantined[0]
        log.error("quarantine_refused", error=str(exc))
        original = held.incoming
        fallback = Incoming(
            original.mid,
            original.qos,
            "<unstorable topic>",
            original.payload,
            original.received_at,
            original.generation,
        )
        await self._commit(
            Judged(quarantined=[Quarantined(fallback, held.reason, held.reason.value)]), outcome
        )

    async def _commit(self, judged: Judged, outcome: Outcome) -> None:
        readings = [a for a in judged.accepted if a.is_telemetry]
        events = [a for a in judged.accepted if not a.is_telemetry]
        started = time.perf_counter()
        part = Outcome()
        fresh: list[Accepted] = []
        new_pumps: dict[str, str | None] = {}
        for a in judged.accepted:
            if a.message.serial not in self._pumps and new_pumps.get(a.message.serial) is None:
                new_pumps[a.message.serial] = a.model
        async with self.pool.acquire() as conn, conn.transaction():
            if new_pumps:
                await conn.execute(sql.INSERT_PUMPS, list(new_pumps), list(new_pumps.values()))
            stored_before: set[str] = set()  # the ledger's duplicates
            if readings:
                await conn.copy_records_to_table(
                    "stage_readings",
                    records=[a.row for a in readings],
                    columns=sql.STAGE_READING_COLUMNS,
                )
                stored_before.update(str(r[0]) for r in await conn.fetch(sql.STORE_READINGS))
            if events:
                await conn.copy_records_to_table(
                    "stage_events", records=[a.row for a in events], columns=sql.EVENT_COLUMNS
                )
                stored_before.update(str(r[0]) for r in await conn.fetch(sql.STORE_EVENTS))
            if judged.accepted:
                fresh = [a for a in judged.accepted if a.msg_id not in stored_before]
                for a in fresh:
                    part.stored["telemetry" if a.is_telemetry else "events"] += 1
                part.duplicates = len(judged.accepted) - len(fresh)
                await self._sequences(conn, fresh, part)
            if judged.quarantined:
                rows = quarantine_rows(judged.quarantined)
                await conn.execute(sql.UPSERT_QUARANTINE, *_columns(rows))
                part.quarantined.update(q.reason.value for q in judged.quarantined)
            if fresh:
                await channels.pumps_changed(conn, {a.message.serial for a in fresh})
        self._pumps.update(new_pumps)
        self._observe(judged, part, time.perf_counter() - started, fresh)
        outcome.stored.update(part.stored)
        outcome.duplicates += part.duplicates
        outcome.quarantined.update(part.quarantined)
        outcome.gaps_opened += part.gaps_opened
        outcome.missing += part.missing
        outcome.late_filled += part.late_filled
        outcome.recovered.extend(part.recovered)
        if part.gaps_opened and self.on_gaps_opened is not None:
            self.on_gaps_opened()

    def _observe(
        self, judged: Judged, part: Outcome, seconds: float, fresh: list[Accepted]
    ) -> None:
        m = self.metrics
        m.batch_size.observe(len(judged))
        m.commit_seconds.observe(seconds)
        for kind, count in part.stored.items():
            m.stored.labels(kind=kind).inc(count)
        for reason, count in part.quarantined.items():
            m.quarantined.labels(reason=reason).inc(count)
        m.duplicates.inc(part.duplicates)
        m.sequence_gaps.inc(part.gaps_opened)
        m.sequence_missing.inc(part.missing)
        m.sequence_filled.inc(part.late_filled)
        for gap in part.recovered:
            requested = "true" if gap.requested else "false"
            m.gaps_recovered.labels(requested=requested).inc()
            m.recovery_seconds.labels(requested=requested).observe(gap.age_s)
        now = time.time()
        m.last_commit.set(now)
        m.database_up.set(1)
        window = self.config.live_window_s
        for a in fresh:
            if a.is_telemetry:
                lag = now - a.message.recorded_at.timestamp()
                if 0 <= lag <= window:
                    m.lag_seconds.observe(lag)

    async def _sequences(self, conn: Connection, fresh: list[Accepted], part: Outcome) -> None:
        """Advance each (pump, source) stream; open the gaps it shows, fill those late ones hit."""
        streams: dict[tuple[str, str], dict[int, datetime]] = defaultdict(dict)
        for a in fresh:
            seq = a.message.sequence
            if seq is not None:
                key = (a.message.serial, a.message.source_id or "")
                streams[key][seq] = a.message.recorded_at
        if not streams:
            return
        keys = sorted(streams)
        tops = [max(streams[k]) for k in keys]
        # Only the streams the batch does not just continue come back (the statement's note).
        rows = await conn.fetch(
            sql.ADVANCE_SEQUENCE_STREAMS,
            [k[0] for k in keys],
            [k[1] for k in keys],
            tops,
            [streams[k][top] for k, top in zip(keys, tops, strict=True)],
            [min(streams[k]) for k in keys],
            [len(streams[k]) for k in keys],
        )
        new_gaps: list[tuple[str, str, int, int, datetime | None, datetime | None]] = []
        late: dict[tuple[str, str], list[int]] = {}
        for row in rows:
            key = (row["serial"], row["source_id"])
            arrived = streams[key]
            previous_max = row["previous_max"]
            step = sequence.advance(previous_max, arrived)
            # When the messages around each new gap were recorded: its missing period.
            seen = dict(arrived)
            if previous_max is not None and row["previous_max_at"] is not None:
                seen.setdefault(previous_max, row["previous_max_at"])
            new_gaps.extend(
                (key[0], key[1], first, last, seen.get(first - 1), seen.get(last + 1))
                for first, last in step.new_gaps
            )
            if step.late:
                late[key] = step.late
        if late:
            await self._fill_gaps(conn, late, part)
        if new_gaps:
            await conn.execute(sql.INSERT_GAPS, *_columns(new_gaps), self.config.gap_settle_s)
        part.gaps_opened += len(new_gaps)
        part.missing += sequence.missing_count((g[2], g[3]) for g in new_gaps)

    async def _fill_gaps(
        self, conn: Connection, late: dict[tuple[str, str], list[int]], part: Outcome
    ) -> None:
        flat = [(k[0], k[1], s) for k, seqs in late.items() for s in seqs]
        hit = await conn.fetch(sql.LOCK_GAPS_HIT, *_columns(flat))
        if not hit:
            return
        pieces: list[tuple[int, int, int]] = []
        for gap in hit:
            key = (gap["serial"], gap["source_id"])
            missing = (gap["first_missing"], gap["last_missing"])
            rest = sequence.fill(missing, late[key])
            part.late_filled += sequence.missing_count([missing]) - sequence.missing_count(rest)
            pieces.extend((gap["id"], first, last) for first, last in rest)
        if pieces:
            await conn.execute(sql.INSERT_GAP_PIECES, *_columns(pieces))
        await conn.execute(sql.DELETE_GAPS, [g["id"] for g in hit])
        roots = {g["root"]: g for g in hit}
        closed = await conn.fetch(sql.ROOTS_CLOSED, list(roots))
        now = datetime.now(UTC)
        for row in closed:
            gap = roots[row["root"]]
            part.recovered.append(
                Recovered((now - gap["detected_at"]).total_seconds(), gap["requests"] > 0)
            )


def _is_data_error(exc: BaseException) -> bool:
    """The data of some message is at fault (not the connection, not the server's state)."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state.startswith(("22", "23"))
    # Client-side encoding failures; asyncpg's own DataError is a ValueError too.
    return isinstance(exc, (ValueError, TypeError, OverflowError))


def _columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows to one list per column, for ``unnest($1::…[], $2::…[])``."""
    return [list(col) for col in zip(*rows, strict=True)]
