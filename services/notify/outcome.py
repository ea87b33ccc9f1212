"""What follows a delivery attempt, recorded with the attempt in one transaction: delivered,
retried later (exponential backoff with jitter, :mod:`services.notify.backoff`), or failed when
the retry window is over — then the clinic's admin contacts are told (outbox
``delivery.failed``), and a webhook failing ``webhook_disable_after_failures`` deliveries in a
row is disabled (outbox ``webhook.disabled``, its waiting deliveries cancelled). The attempt a
process lost (it died mid-delivery; the lease ran out and the delivery was claimed again) is
recorded as ``interrupted``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

import asyncpg

from services.domain.notifications import ADMIN_EVENTS
from services.domain.webhook_urls import redacted
from services.logs import get
from services.notify import sql
from services.notify.backoff import RetryPolicy, next_attempt
from services.notify.channel import Result
from services.notify.claimed import Claimed
from services.notify.metrics import NotifyMetrics
from services.notify.settings import NotifySettings
from services.notify.timing import Clock, iso
from services.notify.webhooks import url_host
from services.storage import outbox
from services.storage.database import DATABASE_ERRORS, Connection

log = get(__name__)

_RECORD_TRIES = 5


class Outcomes:
    """Records the outcomes of attempts (``settings``: when a webhook is disabled)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: NotifySettings,
        metrics: NotifyMetrics,
        *,
        policy: RetryPolicy,
        clock: Clock,
        rand: Callable[[], float],
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.policy = policy
        self.clock = clock
        self.rand = rand

    async def record(
        self,
        d: Claimed,
        result: Result | None,
        at: datetime,
        duration_s: float,
        *,
        cancel: str | None = None,
    ) -> None:
        """Record the attempt and what follows, in one transaction (retried a few times; if
        the database stays away, the lease runs out and the delivery is sent again)."""
        delay = 0.2
        for attempt in range(1, _RECORD_TRIES + 1):
            try:
                if result is not None and result.delivered and d.previous_claim is None:
                    status = await self._delivered(d, result, at, duration_s)
                    break
                async with self.pool.acquire() as conn, conn.transaction():
                    status = await self._apply(
                        conn, d, result, at=at, duration_s=duration_s, cancel=cancel
                    )
                break
            except DATABASE_ERRORS as exc:
                if attempt == _RECORD_TRIES:
                    log.warning("notify_record_failed", delivery_id=d.id, error=str(exc))
                    return
                await asyncio.sleep(delay)
                delay *= 2
        self._observe(d, result, status)

    async def _delivered(self, d: Claimed, result: Result, at: datetime, duration_s: float) -> str:
        await self.pool.execute(
            sql.RECORD_DELIVERED,
            d.id,
            at,
            d.channel,
            d.target,
            result.status_code,
            round(duration_s * 1000, 3),
            d.webhook_id,
            self.clock(),
        )
        return "delivered"

    async def _apply(
        self,
        conn: Connection,
        d: Claimed,
        result: Result | None,
        *,
        at: datetime,
        duration_s: float,
        cancel: str | None,
    ) -> str:
        now = self.clock()
        if d.previous_claim is not None:
            await conn.execute(
                sql.INSERT_ATTEMPT,
                d.id,
                d.previous_claim,
                d.channel,
                d.target,
                "interrupted",
                None,
                "no outcome was recorded before the lease ran out (the worker stopped)",
                None,
            )
            self.metrics.attempts.labels(channel=d.channel, outcome="interrupted").inc()
        if cancel is not None or result is None:
            await conn.execute(sql.CANCELLED, d.id, now, cancel)
            return "cancelled"
        await conn.execute(
            sql.INSERT_ATTEMPT,
            d.id,
            at,
            d.channel,
            d.target,
            result.outcome,
            result.status_code,
            result.error,
            round(duration_s * 1000, 3),
        )
        if result.delivered:
            await conn.execute(sql.DELIVERED, d.id, now)
            if d.webhook_id is not None:
                await conn.execute(sql.WEBHOOK_SUCCEEDED, d.webhook_id)
            return "delivered"
        later = (
            None
            if result.permanent
            else next_attempt(
                now=now,
                due_at=d.due_at,
                failed_attempts=max(d.attempts, 1),
                policy=self.policy,
                rand=self.rand(),
            )
        )
        if later is not None:
            await conn.execute(sql.RETRY_LATER, d.id, later, result.error)
            return "pending"
        if await conn.fetchval(sql.FAILED, d.id, now, result.error) is None:
            return "pending"  # someone else finished it meanwhile
        log.warning(
            "delivery_failed",
            delivery_id=d.id,
            channel=d.channel,
            kind=d.event,
            attempts=d.attempts,
            host=url_host(d.target) if d.channel == "webhook" else None,
            error=result.error,
        )
        await tell_admins(conn, d, result, now)
        if d.webhook_id is not None:
            await count_webhook_failure(
                conn,
                d,
                result,
                now,
                limit=self.settings.webhook_disable_after_failures,
                metrics=self.metrics,
            )
        return "failed"

    def _observe(self, d: Claimed, result: Result | None, status: str) -> None:
        if status in ("delivered", "failed", "cancelled"):
            self.metrics.deliveries.labels(channel=d.channel, status=status).inc()
        if status == "delivered" and d.attempts == 1 and d.due_at <= d.created_at:
            created = d.payload.get("created_at")
            if isinstance(created, str):
                latency = (self.clock() - datetime.fromisoformat(created)).total_seconds()
                if latency >= 0:
                    self.metrics.delivery_latency_seconds.labels(channel=d.channel).observe(latency)


async def tell_admins(conn: Connection, d: Claimed, result: Result, now: datetime) -> None:
    """The clinic's admin contacts are told that ``d`` failed (outbox ``delivery.failed``)."""
    if d.event in ADMIN_EVENTS or d.clinic_id is None:
        return  # a notice about a notice that failed: logged, not repeated
    await outbox.add(
        conn,
        "delivery.failed",
        {
            "delivery_id": d.id,
            "event": d.event,
            "channel": d.channel,
            "target": redacted(d.target) if d.channel == "webhook" else d.target,
            "webhook_id": d.webhook_id,
            "alert_id": d.alert_id,
            "attempts": d.attempts,
            "due_at": iso(d.due_at),
            "failed_at": iso(now),
            "last_error": result.error,
        },
        alert_id=d.alert_id,
        clinic_id=d.clinic_id,
    )


async def count_webhook_failure(
    conn: Connection,
    d: Claimed,
    result: Result,
    now: datetime,
    *,
    limit: int,
    metrics: NotifyMetrics,
) -> None:
    """Count a failed delivery against its webhook; at ``limit`` failures in a row the webhook
    is disabled (outbox ``webhook.disabled``) and its waiting deliveries cancelled."""
    failures = await conn.fetchval(sql.WEBHOOK_FAILED, d.webhook_id)
    if failures is None or failures < limit:
        return
    reason = f"{failures} deliveries in a row failed; the last: {result.error}"
    row = await conn.fetchrow(sql.DISABLE_WEBHOOK, d.webhook_id, now, reason[:1000])
    if row is None:
        return
    await conn.execute(sql.CANCEL_WEBHOOK_DELIVERIES, d.webhook_id, now, "the webhook was disabled")
    await outbox.add(
        conn,
        "webhook.disabled",
        {
            "webhook_id": str(row["id"]),
            "url": redacted(row["url"]),
            "disabled_at": iso(row["disabled_at"]),
            "reason": row["disabled_reason"],
            "consecutive_failures": row["consecutive_failures"],
        },
        clinic_id=row["clinic_id"],
    )
    metrics.webhooks_disabled.inc()
    log.warning(
        "webhook_disabled",
        webhook_id=str(row["id"]),
        clinic_id=str(row["clinic_id"]),
        host=url_host(row["url"]),
        consecutive_failures=failures,
    )
