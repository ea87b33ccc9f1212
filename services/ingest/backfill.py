"""Backfill (MQTT contract 1.1): ask a source again for the messages a sequence gap lost.

A part of ``pumpwatch ingest``, beside the writer: ingest finds the gaps (in the transaction
that stores the messages), already holds the broker connection that may write
``pumps/+/commands`` (deploy/mosquitto/secure/acl), and is where the re-sent messages come back
as ordinary messages, stored once by the ledger and filling their gap like any late arrival.
The worker's state is in the database (``sequence_gaps``), not in the process, so a restarted
ingest carries on where the last one stopped, and several instances share the work: a request is
claimed and its next due time moved out in one statement (``FOR UPDATE SKIP LOCKED``), so each
request goes out from one instance.

Each round: open gaps older than ``backfill_give_up_after_s`` become ``unrecoverable`` (never
asked for again; the telemetry_gap alert is raised for them); then open gaps that are due are
claimed and one ``resend`` command per gap is published (QoS 1). A gap is due first
``backfill_settle_s`` after its detection, then again after ``backfill_retry_initial_s``,
doubling up to ``backfill_retry_max_s``, while it stays open. Gaps at the newest end of a stream
do not exist: a gap opens only when a later number has arrived.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from services.domain.contract import encode_resend
from services.ingest import sql
from services.ingest.metrics import IngestMetrics
from services.logs import get
from services.storage import channels
from services.storage.database import DATABASE_ERRORS

log = get(__name__)

Publish = Callable[[str, bytes], bool]
"""Publish (topic, payload) with QoS 1; False when it could not be handed to the broker."""


@dataclass(frozen=True, slots=True)
class BackfillConfig:
    give_up_after_s: float
    retry_initial_s: float
    retry_max_s: float
    poll_interval_s: float
    batch_max_gaps: int
    command_topic: Callable[[str], str]


class Backfill:
    def __init__(
        self,
        pool: asyncpg.Pool,
        config: BackfillConfig,
        metrics: IngestMetrics,
        publish: Publish,
        connected: Callable[[], bool],
    ) -> None:
        self.pool = pool
        self.config = config
        self.metrics = metrics
        self.publish = publish
        self.connected = connected
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """A commit opened a gap: look sooner than the next poll (its settle time still holds)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                busy = await self.round()
            except DATABASE_ERRORS as exc:
                log.warning("backfill_round_failed", error=str(exc))
                busy = False
            if busy:
                await asyncio.sleep(0)
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval_s)
                # Woken by a new gap: it is due after its settle time, not now.
                await asyncio.sleep(min(self.config.poll_interval_s, 0.2))
            except TimeoutError:
                pass

    async def round(self) -> bool:
        """Give up on expired gaps, then request the due ones. True if more may be due now."""
        await self._give_up()
        if not self.connected():
            return False
        return await self._request()

    async def _give_up(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(sql.GIVE_UP_GAPS, self.config.give_up_after_s)
            if rows:
                # The alert service judges these pumps again now (telemetry_gap), not at its
                # next sweep.
                await channels.pumps_changed(conn, {r["serial"] for r in rows})
        if not rows:
            return
        self.metrics.gaps_given_up.inc(len({r["root"] for r in rows}))
        for row in rows:
            missing = row["last_missing"] - row["first_missing"] + 1
            self.metrics.missing_given_up.inc(missing)
            log.warning(
                "gap_unrecoverable",
                serial=row["serial"],
                source_id=row["source_id"],
                from_seq=row["first_missing"],
                to_seq=row["last_missing"],
                missing=missing,
                requests=row["requests"],
                detected_at=row["detected_at"].isoformat(),
                missing_after=_iso(row["before_at"]),
                missing_before=_iso(row["after_at"]),
            )

    async def _request(self) -> bool:
        config = self.config
        async with self.pool.acquire() as conn, conn.transaction():
            claimed = await conn.fetch(
                sql.CLAIM_GAP_REQUESTS,
                config.batch_max_gaps,
                config.retry_initial_s,
                config.retry_max_s,
            )
        now = datetime.now(UTC)
        for gap in claimed:
            request_id = str(uuid.uuid4())
            payload = encode_resend(
                gap["source_id"], gap["first_missing"], gap["last_missing"], request_id, now
            )
            sent = self.publish(config.command_topic(gap["serial"]), payload)
            if sent:
                self.metrics.backfill_requests.inc()
            else:
                self.metrics.backfill_refused.inc()
            log.info(
                "backfill_requested" if sent else "backfill_request_not_sent",
                serial=gap["serial"],
                source_id=gap["source_id"],
                from_seq=gap["first_missing"],
                to_seq=gap["last_missing"],
                attempt=gap["requests"],
                request_id=request_id,
            )
        return len(claimed) >= config.batch_max_gaps


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()
