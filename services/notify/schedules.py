"""The worker's periodic steps: the daily digests made when due (what is in one:
:mod:`services.notify.digest`), the backlog gauges, and :func:`every`, which runs a step at an
interval until ``stop`` (the escalation check, :mod:`services.notify.escalation`, is one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

from services.logs import get
from services.notify import digest as digests
from services.notify import sql
from services.notify.clinic import clinic_settings, zone
from services.notify.metrics import NotifyMetrics
from services.notify.settings import NotifySettings
from services.notify.timing import Clock, iso, pause
from services.storage.database import DATABASE_ERRORS

log = get(__name__)


class Digests:
    """Makes each clinic's daily digest (email deliveries to its digest recipients) once it is
    due; remembers which it made or found made, so it looks them up once per clinic and day.
    ``wake`` is set when it made deliveries."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: NotifySettings,
        metrics: NotifyMetrics,
        *,
        clock: Clock,
        wake: asyncio.Event,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.wake = wake
        self._done: set[tuple[str, str]] = set()

    async def make(self) -> int:
        """Make the digests due now that are not made yet; returns how many clinics got one."""
        now = self.clock()
        made = 0
        for clinic in await self.pool.fetch(sql.CLINICS):
            clinic_id = str(clinic["id"])
            settings = clinic_settings(clinic["notification_settings"], clinic_id)
            tz = zone(clinic["timezone"])
            day = digests.digest_day(settings.digest, now, tz)
            if day is None or (clinic_id, day.isoformat()) in self._done:
                continue
            recipients = list(dict.fromkeys(settings.digest.to(settings.email)))
            keys = [digests.digest_key(clinic_id, day, r) for r in recipients]
            if not recipients or await digests.made(self.pool, keys):
                self._done.add((clinic_id, day.isoformat()))
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
            self._done.add((clinic_id, day.isoformat()))
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
            self.wake.set()
        return made


async def count_backlog(pool: asyncpg.Pool, metrics: NotifyMetrics, clock: Clock) -> None:
    """Set the gauges: outbox events waiting and the oldest one's age, deliveries pending."""
    row = await pool.fetchrow(sql.BACKLOG)
    assert row is not None
    metrics.outbox_backlog.set(row["events"])
    oldest = row["oldest"]
    age = 0.0 if oldest is None else max(0.0, (clock() - oldest).total_seconds())
    metrics.outbox_oldest_age.set(age)
    metrics.pending_deliveries.set(row["pending"])


async def every(
    interval_s: float,
    step: Callable[[], Coroutine[Any, Any, Any]],
    name: str,
    *,
    stop: asyncio.Event,
) -> None:
    """Run ``step`` every ``interval_s`` until ``stop``; its failures are logged, not raised."""
    while not stop.is_set():
        try:
            await step()
        except DATABASE_ERRORS as exc:
            log.warning("notify_step_failed", step=name, error=str(exc))
        except Exception:  # a bug must not stop alert evaluation: logged, tried again
            log.exception("notify_step_crashed", step=name)
        await pause(stop, interval_s)
