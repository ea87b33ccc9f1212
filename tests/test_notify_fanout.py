"""Fan-out never loses an event: one whose deliveries cannot be built stays in the outbox (the
backlog shows it) while the others go out."""

from __future__ import annotations

import uuid

from tests.notify_support import clinic_with_pump, evaluate, pool_for, running, settings, stall

SERIAL = "NGPFAN0001"
ROUTING = {"email": {"high": ["oncall@clinic.example"]}, "digest": {"enabled": False}}


async def test_an_event_that_cannot_be_fanned_out_stays_in_the_outbox(database_url: str) -> None:
    async with pool_for(database_url) as pool:
        clinic_id, _ = await clinic_with_pump(pool, SERIAL, notification_settings=ROUTING)
        await stall(pool, SERIAL)
        await evaluate(pool, SERIAL)  # a good alert.opened event
        alert_id = await pool.fetchval("SELECT id FROM alerts")
        # An alert event whose email cannot be written (as a bug would leave it: a time that
        # is not one).
        broken = await pool.fetchval(
            "INSERT INTO outbox (event, alert_id, clinic_id, payload) VALUES ('alert.opened', $1, "
            '$2, \'{"priority": "high", "opened_at": "not a time"}\') RETURNING id',
            alert_id,
            uuid.UUID(clinic_id),
        )
        async with running(pool, settings(database_url), loops=False) as worker:
            taken = await worker.notifications.fanout_once()
            assert taken == 1  # the good one; the broken one is left, not taken
            assert worker.metrics.fanout_failures._value.get() == 1
            assert await worker.notifications.fanout_once() == 0  # tried again, still there
            assert worker.metrics.fanout_failures._value.get() == 2
        left = await pool.fetch("SELECT id FROM outbox WHERE dispatched_at IS NULL")
        assert [r["id"] for r in left] == [broken]
        assert await pool.fetchval("SELECT count(*) FROM deliveries") == 1
