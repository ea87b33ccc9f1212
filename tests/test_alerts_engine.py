"""The alert engine against a real PostgreSQL: lifecycle, history, outbox, concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.alerts.engine import Engine
from services.alerts.metrics import AlertsMetrics
from services.domain.alerting import RuleSettings
from services.storage.database import prepare_connection
from tests import alert_fixtures as fx

SERIAL = "NGP000001A"


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4, init=prepare_connection)
    assert pool is not None
    yield pool
    await pool.close()


def engine(pool: asyncpg.Pool, *, flap_hours: float = 6.0) -> Engine:
    return Engine(
        pool,
        settings=RuleSettings(),
        flap_window=timedelta(hours=flap_hours),
        data_clock=False,
        metrics=AlertsMetrics(),
    )


async def alerts(pool: asyncpg.Pool, rule: str | None = None) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT *, alert_clinic(serial, resolved_at) AS clinic_id FROM alerts "
        "WHERE ($1::text IS NULL OR rule = $1) ORDER BY opened_at",
        rule,
    )


async def history(pool: asyncpg.Pool, alert_id: Any) -> list[tuple[str, str, str]]:
    rows = await pool.fetch(
        "SELECT action, to_status, to_priority FROM alert_history WHERE alert_id = $1 ORDER BY id",
        alert_id,
    )
    return [(r["action"], r["to_status"], r["to_priority"]) for r in rows]


async def outbox(pool: asyncpg.Pool) -> list[tuple[str, str, str]]:
    rows = await pool.fetch("SELECT event, payload FROM outbox ORDER BY id")
    return [(r["event"], r["payload"]["rule"], r["payload"]["status"]) for r in rows]


async def pump_with_days_left(pool: asyncpg.Pool, days: float, **patient: Any) -> None:
    """A pump whose reservoir reaches its 2 mL alarm ``days`` from now at 0.2 mL/day."""
    async with pool.acquire() as conn:
        clinic_id = await fx.clinic(conn)
        patient_id = await fx.patient(conn, clinic_id, **patient)
        await fx.pump(conn, SERIAL, patient_id=patient_id)
        await fx.reading(
            conn,
            SERIAL,
            datetime.now(UTC) - timedelta(minutes=5),
            volume_ml=2.0 + 0.2 * days + 0.2 * 5 / 1440,
        )


async def test_refill_due_opens_with_history_and_outbox_and_a_booked_visit_resolves_it(
    pool: asyncpg.Pool,
) -> None:
    await pump_with_days_left(pool, 10)
    result = await engine(pool).evaluate([SERIAL])
    assert result.evaluated == 1
    [alert] = await alerts(pool, "refill_due")
    assert (alert["status"], alert["priority"]) == ("open", "low")
    assert "10 days" in alert["title"]
    assert alert["clinic_id"] is not None
    assert await history(pool, alert["id"]) == [("opened", "open", "low")]

    async with pool.acquire() as conn:
        await conn.execute("UPDATE pumps SET refill_appointment_at = now() + interval '5 days'")
    await engine(pool).evaluate([SERIAL])
    [alert] = await alerts(pool, "refill_due")
    assert alert["status"] == "resolved"
    assert alert["resolved_by"] == "pumpwatch-alerts"
    assert alert["resolution"]
    assert await history(pool, alert["id"]) == [
        ("opened", "open", "low"),
        ("resolved", "resolved", "low"),
    ]
    assert [e for e in await outbox(pool) if e[1] == "refill_due"] == [
        ("alert.opened", "refill_due", "open"),
        ("alert.resolved", "refill_due", "resolved"),
    ]


async def test_a_worsening_condition_escalates_the_same_alert(pool: asyncpg.Pool) -> None:
    await pump_with_days_left(pool, 10)
    await engine(pool).evaluate([SERIAL])
    async with pool.acquire() as conn:
        await fx.reading(
            conn, SERIAL, datetime.now(UTC) - timedelta(minutes=1), volume_ml=2.0 + 0.2 * 5
        )
    await engine(pool).evaluate([SERIAL])
    [alert] = await alerts(pool, "refill_due")
    assert (alert["status"], alert["priority"]) == ("open", "medium")
    assert await history(pool, alert["id"]) == [
        ("opened", "open", "low"),
        ("escalated", "open", "medium"),
    ]


async def test_a_rule_firing_again_within_the_flap_window_reopens_its_alert(
    pool: asyncpg.Pool,
) -> None:
    await pump_with_days_left(pool, 10)
    await engine(pool).evaluate([SERIAL])
    async with pool.acquire() as conn:
        await conn.execute("UPDATE pumps SET refill_appointment_at = now() + interval '5 days'")
    await engine(pool).evaluate([SERIAL])
    async with pool.acquire() as conn:
        await conn.execute("UPDATE pumps SET refill_appointment_at = NULL")
    await engine(pool).evaluate([SERIAL])
    [alert] = await alerts(pool, "refill_due")
    assert alert["status"] == "open"
    assert [a for a, _, _ in await history(pool, alert["id"])] == ["opened", "resolved", "reopened"]


async def test_outside_the_flap_window_a_new_alert_opens(pool: asyncpg.Pool) -> None:
    await pump_with_days_left(pool, 10)
    quick = engine(pool, flap_hours=0)
    await quick.evaluate([SERIAL])
    async with pool.acquire() as conn:
        await conn.execute("UPDATE pumps SET refill_appointment_at = now() + interval '5 days'")
    await quick.evaluate([SERIAL])
    async with pool.acquire() as conn:
        await conn.execute("UPDATE pumps SET refill_appointment_at = NULL")
    await quick.evaluate([SERIAL])
    assert [a["status"] for a in await alerts(pool, "refill_due")] == ["resolved", "open"]


async def test_two_engines_at_once_raise_one_alert(pool: asyncpg.Pool, database_url: str) -> None:
    await pump_with_days_left(pool, 1)
    other = await asyncpg.create_pool(database_url, min_size=1, max_size=2, init=prepare_connection)
    assert other is not None
    try:
        await asyncio.gather(
            *(
                e.evaluate([SERIAL])
                for e in (engine(pool), engine(other), engine(pool), engine(other))
            )
        )
    finally:
        await other.close()
    [alert] = await alerts(pool, "refill_due")
    assert alert["priority"] == "high"
    assert await history(pool, alert["id"]) == [("opened", "open", "high")]


async def test_the_database_refuses_a_second_unresolved_alert(pool: asyncpg.Pool) -> None:
    await pump_with_days_left(pool, 10)
    await engine(pool).evaluate([SERIAL])
    with pytest.raises(asyncpg.UniqueViolationError):
        await pool.execute(
            "INSERT INTO alerts (serial, rule, priority, status, title, detail, opened_at, "
            "updated_at, condition_at) VALUES ($1, 'refill_due', 'low', 'open', 't', 'd', "
            "now(), now(), now())",
            SERIAL,
        )


async def test_flow_stopped_clears_only_after_confirming_readings(pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        await fx.pump(conn, SERIAL)
        await fx.reading(conn, SERIAL, now - timedelta(hours=3), alarms=("motor_stall",))
    await engine(pool).evaluate([SERIAL])
    [alert] = await alerts(pool, "flow_stopped")
    assert (alert["status"], alert["priority"], alert["clinic_id"]) == ("open", "high", None)
    async with pool.acquire() as conn:
        await fx.reading(conn, SERIAL, now - timedelta(hours=2))
    await engine(pool).evaluate([SERIAL])
    assert [a["status"] for a in await alerts(pool, "flow_stopped")] == ["open"]
    async with pool.acquire() as conn:
        await fx.reading(conn, SERIAL, now - timedelta(hours=1))
    await engine(pool).evaluate([SERIAL])
    [alert] = await alerts(pool, "flow_stopped")
    assert alert["status"] == "resolved"


async def test_a_clinic_override_moves_the_refill_due_boundary(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        clinic_id = await fx.clinic(conn, alert_settings={"refill_due_low_days": 21})
        patient_id = await fx.patient(conn, clinic_id)
        await fx.pump(conn, SERIAL, patient_id=patient_id)
        await fx.reading(
            conn, SERIAL, datetime.now(UTC) - timedelta(minutes=5), volume_ml=2.0 + 0.2 * 20
        )
    await engine(pool).evaluate([SERIAL])
    assert [a["priority"] for a in await alerts(pool, "refill_due")] == ["low"]


async def test_programmed_doses_are_recorded_as_they_change(pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        await fx.pump(conn, SERIAL)
        await fx.reading(conn, SERIAL, now - timedelta(hours=2), rate_ml_per_day=0.2)
    await engine(pool).evaluate([SERIAL])
    await engine(pool).evaluate([SERIAL])
    async with pool.acquire() as conn:
        await fx.reading(conn, SERIAL, now - timedelta(hours=1), rate_ml_per_day=0.25)
    await engine(pool).evaluate([SERIAL])
    doses = await pool.fetch("SELECT daily_dose_mcg FROM dose_history ORDER BY at")
    assert [d["daily_dose_mcg"] for d in doses] == [400.0, 500.0]


async def test_a_discrepancy_resolved_by_a_clinician_stays_resolved(pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        await fx.pump(conn, SERIAL)
        await fx.reading(conn, SERIAL, now - timedelta(days=1), volume_ml=30.0)
        await fx.refill_event(
            conn, SERIAL, now - timedelta(hours=2), residual_ml=5.0, expected_residual_ml=10.0
        )
    await engine(pool).evaluate([SERIAL])
    [alert] = await alerts(pool, "refill_discrepancy")
    assert alert["status"] == "open"
    assert alert["occurrence"] is not None, dict(alert)
    await pool.execute(
        "UPDATE alerts SET status = 'resolved', resolved_at = now(), "
        "resolved_by = 'key:clinician' WHERE id = $1",
        alert["id"],
    )
    await engine(pool).evaluate([SERIAL])
    assert [a["status"] for a in await alerts(pool, "refill_discrepancy")] == ["resolved"]
