"""Escalation of unacknowledged high alerts on an injected clock: re-sent to the high-priority
addresses and the escalation contacts at the configured times, recorded in the alert's
history, and no more once someone acknowledges."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from tests.notify_support import (
    acknowledge,
    clinic_with_pump,
    evaluate,
    pool_for,
    running,
    settings,
    smtp_sink,
    stall,
)

SERIAL = "NGP700001A"
ROUTING = {
    "email": {"high": ["oncall@clinic.example"]},
    "escalation": {
        "contacts": ["consultant@clinic.example"],
        "after_minutes": 15,
        "repeat_minutes": 10,
    },
    "digest": {"enabled": False},
}


@dataclass
class FakeClock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now


async def escalations(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT at, reason, facts FROM alert_history "
        "WHERE action = 'notification_escalated' ORDER BY id"
    )


def settled(pool: asyncpg.Pool) -> Callable[[], Awaitable[bool]]:
    """Every delivery has its outcome recorded. The clock may jump only then: a jump past the
    lease of a delivery that was sent but whose outcome is not yet recorded would (rightly) have
    it sent again, as if its worker had died."""
    return lambda: pool.fetchval("SELECT count(*) = 0 FROM deliveries WHERE status = 'pending'")


async def test_an_unacknowledged_high_alert_is_escalated_at_the_set_times_until_acknowledged(
    database_url: str,
) -> None:
    async with pool_for(database_url) as pool:
        with smtp_sink() as smtp:
            await clinic_with_pump(pool, SERIAL, notification_settings=ROUTING)
            await stall(pool, SERIAL)
            await evaluate(pool, SERIAL)
            row = await pool.fetchrow(
                "SELECT alert_id, at FROM alert_history WHERE action = 'opened'"
            )
            assert row is not None
            alert_id, opened = row["alert_id"], row["at"]
            clock = FakeClock(opened)
            config = settings(database_url, smtp_url=smtp.url)
            async with running(pool, config, clock=clock) as worker:
                escalate = worker.notifications.escalate_now
                await worker.until(lambda: len(smtp.mails) >= 1)  # the alert itself
                await worker.until(settled(pool))
                clock.now = opened + timedelta(minutes=15) - timedelta(milliseconds=1)
                assert await escalate() == 0
                clock.now = opened + timedelta(minutes=15)
                assert await escalate() == 1
                assert await escalate() == 0  # once per due time
                await worker.until(lambda: len(smtp.mails) >= 3)
                await worker.until(settled(pool))
                clock.now = opened + timedelta(minutes=25) - timedelta(milliseconds=1)
                assert await escalate() == 0
                clock.now = opened + timedelta(minutes=25)
                assert await escalate() == 1
                await worker.until(lambda: len(smtp.mails) >= 5)
                await worker.until(settled(pool))
                await acknowledge(pool, alert_id, at=opened + timedelta(minutes=26))
                for minutes in (35, 45, 120):
                    clock.now = opened + timedelta(minutes=minutes)
                    assert await escalate() == 0
                await worker.until(settled(pool))
                assert worker.metrics.escalations._value.get() == 2
            found = await escalations(pool)
            assert [r["at"] for r in found] == [
                opened + timedelta(minutes=15),
                opened + timedelta(minutes=25),
            ]
            assert [r["facts"]["escalation"] for r in found] == [1, 2]
            assert "not acknowledged 15 min" in found[0]["reason"]
            events = [r["event"] for r in await pool.fetch("SELECT event FROM outbox ORDER BY id")]
            assert events == ["alert.opened", "alert.unacknowledged", "alert.unacknowledged"]
            first, *escalated = smtp.mails
            assert first.recipients == ["oncall@clinic.example"]
            assert sorted(r for m in escalated for r in m.recipients) == [
                "consultant@clinic.example",
                "consultant@clinic.example",
                "oncall@clinic.example",
                "oncall@clinic.example",
            ]
            for mail in escalated:
                assert "NOT ACKNOWLEDGED" in mail.subject
                assert "Test Patient" not in mail.subject
                assert "Not acknowledged after" in mail.part("plain")


async def test_escalation_stops_when_the_alert_resolves_and_skips_lower_priorities(
    database_url: str,
) -> None:
    async with pool_for(database_url) as pool:
        await clinic_with_pump(pool, SERIAL, notification_settings=ROUTING)
        await stall(pool, SERIAL)
        await evaluate(pool, SERIAL)
        opened = await pool.fetchval("SELECT at FROM alert_history WHERE action = 'opened'")
        clock = FakeClock(opened + timedelta(minutes=16))
        async with running(pool, settings(database_url), clock=clock, loops=False) as worker:
            await pool.execute("UPDATE alerts SET priority = 'medium'")
            assert await worker.notifications.escalate_now() == 0  # not high (any more)
            await pool.execute("UPDATE alerts SET priority = 'high'")
            assert await worker.notifications.escalate_now() == 1
            await pool.execute(
                "UPDATE alerts SET status = 'resolved', resolved_at = now(), resolution = 'x'"
            )
            clock.now += timedelta(hours=1)
            assert await worker.notifications.escalate_now() == 0


async def test_escalation_can_be_switched_off_per_clinic(database_url: str) -> None:
    routing = ROUTING | {"escalation": {"enabled": False}}
    async with pool_for(database_url) as pool:
        await clinic_with_pump(pool, SERIAL, notification_settings=routing)
        await stall(pool, SERIAL)
        await evaluate(pool, SERIAL)
        opened = await pool.fetchval("SELECT at FROM alert_history WHERE action = 'opened'")
        clock = FakeClock(opened + timedelta(days=1))
        async with running(pool, settings(database_url), clock=clock, loops=False) as worker:
            assert await worker.notifications.escalate_now() == 0
        assert await escalations(pool) == []


async def test_two_workers_escalate_an_alert_once(database_url: str) -> None:
    async with pool_for(database_url) as pool:
        await clinic_with_pump(pool, SERIAL, notification_settings=ROUTING)
        await stall(pool, SERIAL)
        await evaluate(pool, SERIAL)
        opened = await pool.fetchval("SELECT at FROM alert_history WHERE action = 'opened'")
        clock = FakeClock(opened + timedelta(minutes=15))
        config = settings(database_url)
        async with (
            running(pool, config, clock=clock, loops=False) as one,
            running(pool, config, clock=clock, loops=False) as two,
        ):
            counts = await asyncio.gather(
                one.notifications.escalate_now(), two.notifications.escalate_now()
            )
        assert sorted(counts) == [0, 1]
        assert len(await escalations(pool)) == 1
