"""The notification worker: outbox → deliveries → attempts, as tasks of ``pumpwatch notify`` or
of a thread of ``pumpwatch alerts`` (:mod:`services.notify.runner`).

Fan-out (:mod:`services.notify.fanout`): outbox events become one delivery per channel target by
the clinic's routing; the worker wakes on the outbox trigger's NOTIFY, and also polls.

Delivering. Due deliveries are claimed under a lease (``next_attempt_at`` moved to the lease's
end, committed), sent, and their outcome recorded with the attempt: delivered, retried later
(exponential backoff with jitter, :mod:`services.notify.backoff`), or failed when the
retry window is over — then the clinic's admin contacts are told (outbox ``delivery.failed``),
and a webhook failing ``webhook_disable_after_failures`` deliveries in a row is disabled
(outbox ``webhook.disabled``, its waiting deliveries cancelled). A process that dies
mid-delivery leaves the claim behind; when the lease runs out any instance sends it again and
records the lost attempt as ``interrupted``. So every delivery is made at least once; receivers
dedupe on its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.domain.notifications import ADMIN_EVENTS
from services.logs import get
from services.notify import digest as digests
from services.notify import fanout, sql
from services.notify.backoff import RetryPolicy, next_attempt
from services.notify.channel import Message, Result, Sender, WebhookKeys
from services.notify.clinic import clinic_settings, zone
from services.notify.email import EmailSender
from services.notify.escalation import escalate
from services.notify.metrics import NotifyMetrics
from services.notify.mqtt import MqttSender
from services.notify.settings import NotifySettings
from services.notify.timing import Clock, iso, pause, wait, wall_clock
from services.notify.webhooks import Resolver, WebhookSender, url_host
from services.settings import ConfigError
from services.storage import outbox
from services.storage.database import (
    DATABASE_ERRORS,
    Connection,
)

__all__ = ["Clock", "Notifications", "wall_clock"]  # Clock: what tests pass as ``clock``

log = get(__name__)

_MIN_WAIT_S = 0.02
_RECORD_TRIES = 5
_DRAIN_S = 15.0


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery this worker holds under a lease."""

    id: str
    alert_id: str | None
    clinic_id: str | None
    event: str
    channel: str
    target: str
    webhook_id: str | None
    key: str
    payload: dict[str, Any]
    due_at: datetime
    created_at: datetime
    attempts: int
    previous_claim: datetime | None
    webhook_url: str | None
    keys: WebhookKeys | None
    webhook_gone: str | None
    """Why the webhook may no longer be sent to (deleted, disabled), or None."""

    @classmethod
    def of(cls, row: asyncpg.Record) -> Claimed:
        keys = None
        gone = None
        if row["webhook_id"] is not None:
            if row["secret"] is None:
                gone = "the webhook no longer exists"
            elif row["webhook_deleted_at"] is not None:
                gone = "the webhook was deleted"
            elif row["webhook_disabled_at"] is not None:
                gone = "the webhook is disabled"
            else:
                keys = WebhookKeys(
                    row["secret"], row["previous_secret"], row["previous_secret_expires_at"]
                )
        return cls(
            id=str(row["id"]),
            alert_id=None if row["alert_id"] is None else str(row["alert_id"]),
            clinic_id=None if row["clinic_id"] is None else str(row["clinic_id"]),
            event=row["event"],
            channel=row["channel"],
            target=row["target"],
            webhook_id=None if row["webhook_id"] is None else str(row["webhook_id"]),
            key=row["idempotency_key"],
            payload=row["payload"],
            due_at=row["due_at"],
            created_at=row["created_at"],
            attempts=int(row["attempts"]),
            previous_claim=row["previous_claim"],
            webhook_url=row["webhook_url"],
            keys=keys,
            webhook_gone=gone,
        )


class Notifications:
    """Owns the senders and runs the loops; ``async with`` opens and closes the senders."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: NotifySettings,
        metrics: NotifyMetrics,
        *,
        stop: asyncio.Event,
        database_url: str | None = None,
        clock: Clock = wall_clock,
        resolver: Resolver | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.stop = stop
        self.database_url = database_url
        self.clock = clock
        self.rand = rand
        self.resolver = resolver
        self.policy = RetryPolicy(
            first_s=settings.notify_retry_first_s,
            max_s=settings.notify_retry_max_s,
            jitter_fraction=settings.notify_retry_jitter_fraction,
            window_s=settings.notify_retry_window_s,
        )
        self.senders: dict[str, Sender] = {}
        self.mqtt_enabled = False
        self._outbox_wake = asyncio.Event()
        self._deliver_wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._digests_done: set[tuple[str, str]] = set()

    async def __aenter__(self) -> Notifications:
        settings = self.settings
        self.senders["webhook"] = WebhookSender(
            allow_hosts=settings.allow_hosts(),
            timeout_s=settings.webhook_timeout_s,
            resolver=self.resolver,
            max_connections=max(settings.notify_concurrency, 10),
        )
        self.senders["email"] = EmailSender(
            settings.smtp(),
            sender=settings.smtp_from,
            starttls=settings.smtp_starttls,
            timeout_s=settings.smtp_timeout_s,
        )
        if settings.mqtt_url:
            try:
                target = settings.require_mqtt()
            except ConfigError as exc:  # pragma: no cover - validated with the settings
                log.error("notify_mqtt_unconfigured", error=str(exc))
            else:
                mqtt = MqttSender(
                    target, timeout_s=settings.notify_mqtt_timeout_s, metrics=self.metrics
                )
                mqtt.start()
                self.senders["mqtt"] = mqtt
                self.mqtt_enabled = True
        smtp = settings.smtp()
        log.info(
            "notify_started",
            channels=sorted(self.senders),
            smtp=None if smtp is None else smtp.redacted(),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for sender in reversed(list(self.senders.values())):
            with contextlib.suppress(Exception):
                await sender.aclose()

    def loops(self, *, scheduled: bool = True) -> list[Coroutine[Any, Any, None]]:
        """The worker's tasks; they return when ``stop`` is set (deliveries in flight are
        finished first, for a while). ``scheduled``: with the escalation and digest checks
        (tests run those steps themselves, on their own clock)."""
        loops = [
            fanout.loop(self.fanout_once, self.settings, wake=self._outbox_wake, stop=self.stop),
            self._deliver_loop(),
            self._every(self.settings.notify_gauge_interval_s, self.count_backlog, "gauges"),
        ]
        if scheduled:
            loops += [
                self._every(self.settings.notify_escalation_check_s, self._escalate, "escalation"),
                self._every(self.settings.notify_digest_check_s, self._digests, "digest"),
            ]
        if self.database_url:
            loops.append(fanout.listen(self.database_url, wake=self._outbox_wake, stop=self.stop))
        return loops

    def wake(self) -> None:
        self._outbox_wake.set()
        self._deliver_wake.set()

    # -- fan-out -------------------------------------------------------------------------------

    async def fanout_once(self) -> int:
        """Turn up to a batch of outbox events into deliveries (one transaction); returns how
        many events were taken."""
        return await fanout.fan_out(
            self.pool,
            self.settings,
            self.metrics,
            now=self.clock(),
            mqtt_enabled=self.mqtt_enabled,
            deliveries_wake=self._deliver_wake,
        )

    # -- delivering ----------------------------------------------------------------------------

    async def deliver_due(self) -> int:
        """Claim what is due now (up to the free concurrency) and start sending it; returns how
        many were claimed."""
        free = self.settings.notify_concurrency - len(self._inflight)
        if free <= 0:
            return 0
        now = self.clock()
        rows = await self.pool.fetch(
            sql.CLAIM_DELIVERIES, now, free, float(self.settings.notify_lease_s)
        )
        for row in rows:
            task = asyncio.create_task(self._attempt(Claimed.of(row)), name="notify-attempt")
            self._inflight.add(task)
            task.add_done_callback(self._attempt_done)
        return len(rows)

    async def settle(self) -> None:
        """Wait for the attempts in flight."""
        while self._inflight:
            await asyncio.wait(set(self._inflight))

    def _attempt_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._deliver_wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("notify_attempt_crashed", error=repr(task.exception()))

    async def _deliver_loop(self) -> None:
        delay = 0.1
        try:
            while not self.stop.is_set():
                self._deliver_wake.clear()
                free = self.settings.notify_concurrency - len(self._inflight)
                try:
                    claimed = await self.deliver_due()
                    wait_s = await self._until_next_due()
                except DATABASE_ERRORS as exc:
                    log.warning("notify_claim_failed", error=str(exc), retry_in_s=round(delay, 2))
                    await pause(self.stop, delay)
                    delay = min(delay * 2, 10.0)
                    continue
                delay = 0.1
                if free > 0 and claimed == free:
                    continue  # more may be due
                await wait(self._deliver_wake, self.stop, wait_s)
        finally:
            if self._inflight:
                await asyncio.wait(set(self._inflight), timeout=_DRAIN_S)

    async def _until_next_due(self) -> float:
        poll = self.settings.notify_poll_interval_s
        next_due: datetime | None = await self.pool.fetchval(sql.NEXT_DUE)
        if next_due is None:
            return poll
        seconds = (next_due - self.clock()).total_seconds()
        return min(poll, max(_MIN_WAIT_S, seconds))

    async def _attempt(self, d: Claimed) -> None:
        started_at = self.clock()
        if d.webhook_gone is not None:
            await self._record(d, None, started_at, 0.0, cancel=d.webhook_gone)
            return
        target = d.webhook_url if d.channel == "webhook" and d.webhook_url else d.target
        message = Message(
            delivery_id=d.id,
            message_id=d.key,
            event=d.event,
            target=target,
            payload=d.payload,
            attempt=d.attempts,
            keys=d.keys,
        )
        sender = self.senders.get(d.channel)
        started = time.perf_counter()
        if sender is None:
            result = Result("error", error=f"the {d.channel} channel is not configured")
        else:
            try:
                result = await asyncio.wait_for(
                    sender.send(message), self.settings.notify_lease_s * 0.8
                )
            except TimeoutError:
                result = Result("timeout", error="the attempt outlasted its lease")
            except Exception as exc:  # a channel's bug must not lose the delivery
                log.exception("notify_send_crashed", channel=d.channel, delivery_id=d.id)
                result = Result("error", error=f"{type(exc).__name__}: {exc}"[:500])
        duration = time.perf_counter() - started
        self.metrics.attempts.labels(channel=d.channel, outcome=result.outcome).inc()
        self.metrics.attempt_seconds.labels(channel=d.channel).observe(duration)
        await self._record(d, result, started_at, duration)

    async def _record(
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
        await self._tell_admins(conn, d, result, now)
        if d.webhook_id is not None:
            await self._count_webhook_failure(conn, d, result, now)
        return "failed"

    async def _tell_admins(
        self, conn: Connection, d: Claimed, result: Result, now: datetime
    ) -> None:
        if d.event in ADMIN_EVENTS or d.clinic_id is None:
            return  # a notice about a notice that failed: logged, not repeated
        await outbox.add(
            conn,
            "delivery.failed",
            {
                "delivery_id": d.id,
                "event": d.event,
                "channel": d.channel,
                "target": d.target,
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

    async def _count_webhook_failure(
        self, conn: Connection, d: Claimed, result: Result, now: datetime
    ) -> None:
        failures = await conn.fetchval(sql.WEBHOOK_FAILED, d.webhook_id)
        limit = self.settings.webhook_disable_after_failures
        if failures is None or failures < limit:
            return
        reason = f"{failures} deliveries in a row failed; the last: {result.error}"
        row = await conn.fetchrow(sql.DISABLE_WEBHOOK, d.webhook_id, now, reason[:1000])
        if row is None:
            return
        await conn.execute(
            sql.CANCEL_WEBHOOK_DELIVERIES, d.webhook_id, now, "the webhook was disabled"
        )
        await outbox.add(
            conn,
            "webhook.disabled",
            {
                "webhook_id": str(row["id"]),
                "url": row["url"],
                "disabled_at": iso(row["disabled_at"]),
                "reason": row["disabled_reason"],
                "consecutive_failures": row["consecutive_failures"],
            },
            clinic_id=row["clinic_id"],
        )
        self.metrics.webhooks_disabled.inc()
        log.warning(
            "webhook_disabled",
            webhook_id=str(row["id"]),
            clinic_id=str(row["clinic_id"]),
            host=url_host(row["url"]),
            consecutive_failures=failures,
        )

    def _observe(self, d: Claimed, result: Result | None, status: str) -> None:
        if status in ("delivered", "failed", "cancelled"):
            self.metrics.deliveries.labels(channel=d.channel, status=status).inc()
        if status == "delivered" and d.attempts == 1 and d.due_at <= d.created_at:
            created = d.payload.get("created_at")
            if isinstance(created, str):
                latency = (self.clock() - datetime.fromisoformat(created)).total_seconds()
                if latency >= 0:
                    self.metrics.delivery_latency_seconds.labels(channel=d.channel).observe(latency)

    # -- escalation, digests, gauges -----------------------------------------------------------

    async def _escalate(self) -> None:
        await escalate(self.pool, now=self.clock(), metrics=self.metrics)

    async def escalate_now(self) -> int:
        return await escalate(self.pool, now=self.clock(), metrics=self.metrics)

    async def _digests(self) -> None:
        await self.make_digests()

    async def make_digests(self) -> int:
        """Make the digests due now that are not made yet; returns how many clinics got one."""
        now = self.clock()
        made = 0
        for clinic in await self.pool.fetch(sql.CLINICS):
            clinic_id = str(clinic["id"])
            settings = clinic_settings(clinic["notification_settings"], clinic_id)
            tz = zone(clinic["timezone"])
            day = digests.digest_day(settings.digest, now, tz)
            if day is None or (clinic_id, day.isoformat()) in self._digests_done:
                continue
            recipients = list(dict.fromkeys(settings.digest.to(settings.email)))
            keys = [digests.digest_key(clinic_id, day, r) for r in recipients]
            if not recipients or await digests.made(self.pool, keys):
                self._digests_done.add((clinic_id, day.isoformat()))
                continue
            async with self.pool.acquire() as conn, conn.transaction():
                message = await digests.compose(
                    conn,
                    clinic_id=clinic_id,
                    clinic_name=clinic["name"],
                    settings=settings,
                    tz=tz,
                    day=day,
                    now=now,
                    rule_settings=self.settings.rules,
                )
                payloads = [
                    {
                        "id": key,
                        "type": "digest.daily",
                        "created_at": iso(now),
                        "data": message.data,
                        "email": message.content.as_json(),
                    }
                    for key in keys
                ]
                n = len(recipients)
                await conn.execute(
                    sql.INSERT_DELIVERIES,
                    [None] * n,
                    [None] * n,
                    [clinic["id"]] * n,
                    ["digest.daily"] * n,
                    ["email"] * n,
                    recipients,
                    [None] * n,
                    keys,
                    payloads,
                    [now] * n,
                    now,
                )
            self._digests_done.add((clinic_id, day.isoformat()))
            self.metrics.digests.inc()
            made += 1
            log.info(
                "digest_made",
                clinic_id=clinic_id,
                day=day.isoformat(),
                recipients=n,
                refills=len(message.data["refills"]),
                low_alerts=len(message.data["low_alerts"]),
            )
        if made:
            self._deliver_wake.set()
        return made

    async def count_backlog(self) -> None:
        row = await self.pool.fetchrow(sql.BACKLOG)
        assert row is not None
        self.metrics.outbox_backlog.set(row["events"])
        oldest = row["oldest"]
        age = 0.0 if oldest is None else max(0.0, (self.clock() - oldest).total_seconds())
        self.metrics.outbox_oldest_age.set(age)
        self.metrics.pending_deliveries.set(row["pending"])

    async def _every(
        self, interval_s: float, step: Callable[[], Coroutine[Any, Any, Any]], name: str
    ) -> None:
        while not self.stop.is_set():
            try:
                await step()
            except DATABASE_ERRORS as exc:
                log.warning("notify_step_failed", step=name, error=str(exc))
            except Exception:  # a bug must not stop alert evaluation: logged, tried again
                log.exception("notify_step_crashed", step=name)
            await pause(self.stop, interval_s)
