"""The patient dashboard and the pump reads (`GET /v1/pumps`, `GET /v1/pumps/{serial}`) from the
alert engine's read model (pump_forecasts): the same answer as from the pump's snapshot on a
varied set of pumps, and never from a stale row (a refill, a move, a reading the engine has not
evaluated yet)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.storage.database import Connection
from tests import alert_fixtures as fx
from tests.api_support import Api, World
from tests.test_readmodel import engine, refill_over_http, row, sweep

MOVING = {"days_to_low_alarm", "days_to_refill_deadline", "volume_now_ml"}
"""What the clock moves between two answers."""


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    from services.storage.database import prepare_connection

    found = await asyncpg.create_pool(database_url, min_size=1, max_size=2, init=prepare_connection)
    assert found is not None
    yield found
    await found.close()


async def dashboard(api: Api, key: str, patient_id: str) -> dict[str, Any]:
    found = await api.call("GET", f"/v1/patients/{patient_id}/dashboard", key)
    assert found.status_code == 200, found.text
    answer: dict[str, Any] = found.json()
    return answer


def alike(left: Any, right: Any, path: str = "") -> None:
    """Equal but for what the clock moved between the two answers (to the hundredth of a day
    or the millilitre's hundredth) and the projected series' points (the same from the same
    state, checked where it starts)."""
    if isinstance(left, dict):
        assert isinstance(right, dict), path
        assert left.keys() == right.keys(), path
        for key in left:
            if key in MOVING and left[key] is not None:
                assert right[key] == pytest.approx(left[key], abs=0.011), f"{path}.{key}"
            else:
                alike(left[key], right[key], f"{path}.{key}")
    elif isinstance(left, list):
        assert isinstance(right, list), path
        assert len(left) == len(right), path
        for i, (a, b) in enumerate(zip(left, right, strict=True)):
            alike(a, b, f"{path}[{i}]")
    else:
        assert left == right, path


async def _bolus(conn: Connection, serial: str, at: datetime, dose_mcg: float) -> None:
    await conn.execute(
        "INSERT INTO events (msg_id, serial, type, recorded_at, received_at, body, payload) "
        "VALUES (gen_random_uuid(), $1, 'bolus', $2, now(), $3, '{}')",
        serial,
        at,
        {"dose_mcg": dose_mcg},
    )


async def _flex(conn: Connection, serial: str, schedule: list[dict[str, Any]]) -> None:
    """The pump's readings and state on a flex schedule of these steps."""
    for table in ("readings", "pump_state"):
        await conn.execute(
            f"UPDATE {table} SET infusion_mode = 'flex', schedule = $2 WHERE serial = $1",
            serial,
            schedule,
        )


async def varied(pool: asyncpg.Pool, clinic_a: str) -> dict[str, str]:
    """Pumps unlike each other (serial: patient): refills with and without the pump's expected
    residual and boluses between them, a high-risk patient with a margin, a measured pump at its
    battery's replacement indicator in another zone, a flex schedule, no refill at all, a
    reservoir already at its alarm."""
    now = datetime.now(UTC).replace(microsecond=0)
    out: dict[str, str] = {}
    async with pool.acquire() as conn:
        ny = await fx.clinic(conn, name="New York", timezone="America/New_York")
        # three refills, boluses, the pump's expected residual on the last
        p = await fx.patient(conn, clinic_a, withdrawal_risk="high", low_alarm_margin_ml=4.0)
        await fx.pump(conn, "NGPDASH01", patient_id=p)
        for days, expected in ((70, None), (40, None), (12, 14.5)):
            await fx.reading(conn, "NGPDASH01", now - timedelta(days=days, hours=3), volume_ml=11.0)
            await fx.refill_event(
                conn,
                "NGPDASH01",
                now - timedelta(days=days),
                residual_ml=10.2,
                added_ml=30.0,
                expected_residual_ml=expected,
            )
        for days in (55, 30, 20, 5):
            await _bolus(conn, "NGPDASH01", now - timedelta(days=days), 150.0)
        for hours in range(72, -1, -8):
            await fx.reading(
                conn, "NGPDASH01", now - timedelta(hours=hours), volume_ml=28.0 - hours / 100
            )
        out["NGPDASH01"] = p
        # measured, battery at ERI, another zone, a refill with no expected residual
        p = await fx.patient(conn, ny)
        await fx.pump(conn, "NGPDASH02", patient_id=p)
        await fx.refill_event(conn, "NGPDASH02", now - timedelta(days=20), residual_ml=3.0)
        for hours in range(96, -1, -4):
            await fx.reading(
                conn,
                "NGPDASH02",
                now - timedelta(hours=hours) - timedelta(minutes=7),
                volume_ml=30.0 - hours / 40,
                basis="measured",
                measured_flow_ml_per_day=0.31,
                rate_ml_per_day=0.3,
                battery_status="eri",
            )
        out["NGPDASH02"] = p
        # a flex schedule, no refill
        p = await fx.patient(conn, clinic_a)
        await fx.pump(conn, "NGPDASH03", patient_id=p)
        for hours in (30, 6):
            await fx.reading(conn, "NGPDASH03", now - timedelta(hours=hours), volume_ml=15.0)
        schedule = [
            {"start": "00:00", "rate_ml_per_day": 0.1},
            {"start": "08:30", "rate_ml_per_day": 0.4},
        ]
        await _flex(conn, "NGPDASH03", schedule)
        out["NGPDASH03"] = p
        # a flex schedule in another zone, its steps placed so that the hours since its reading
        # run at 0.1 mL/day by UTC's clock and at 0.4 by New York's (the zone decides the volume)
        p = await fx.patient(conn, ny)
        await fx.pump(conn, "NGPDASH05", patient_id=p)
        await fx.reading(conn, "NGPDASH05", now - timedelta(hours=6), volume_ml=15.0)

        def clock(at: datetime) -> str:
            return f"{at:%H:%M}"

        steps = [
            {"start": clock(now - timedelta(hours=7)), "rate_ml_per_day": 0.1},
            {"start": clock(now + timedelta(hours=1)), "rate_ml_per_day": 0.4},
        ]
        steps.sort(key=lambda step: str(step["start"]))
        await _flex(conn, "NGPDASH05", steps)
        out["NGPDASH05"] = p
        # at its low alarm, with its alarm on
        p = await fx.patient(conn, clinic_a)
        await fx.pump(conn, "NGPDASH04", patient_id=p)
        await fx.refill_event(conn, "NGPDASH04", now - timedelta(days=90), residual_ml=1.0)
        await fx.reading(
            conn, "NGPDASH04", now - timedelta(hours=2), volume_ml=1.5, alarms=("low_reservoir",)
        )
        out["NGPDASH04"] = p
        await fx.rollup(conn)
    return out


async def test_the_dashboard_from_a_fresh_row_equals_the_one_from_the_snapshot(
    api: Api, w: World, pool: asyncpg.Pool
) -> None:
    pumps = await varied(pool, w.a.id)
    pumps[w.a.serial] = w.a.patient_id
    pumps[w.b.serial] = w.b.patient_id
    computed = {s: await dashboard(api, w.admin, p) for s, p in pumps.items()}
    for serial in pumps:
        assert not (await row(pool, serial))["fresh"]  # not evaluated yet: the snapshot's
    await sweep(pool)
    for serial, patient_id in pumps.items():
        assert (await row(pool, serial))["fresh"], serial
        read = await dashboard(api, w.admin, patient_id)
        for side in (computed[serial], read):  # the engine opens and resolves alerts
            side.pop("open_alerts")
        alike(computed[serial], read, serial)
    assert computed["NGPDASH01"]["last_refill"]["discrepancy"]["expected_from"] == "pump"
    assert computed["NGPDASH02"]["pump"]["forecast"]["refill_deadline_reason"] == "battery"
    assert computed["NGPDASH03"]["pump"]["therapy"]["schedule"]
    assert computed["NGPDASH04"]["last_refill"] is not None
    # The dashboard reads the row: a row moved by hand moves the answer.
    await pool.execute(
        "UPDATE pump_forecasts SET deadline_at = deadline_at - interval '1 day' "
        "WHERE serial = 'NGPDASH03'"
    )
    moved = await dashboard(api, w.admin, pumps["NGPDASH03"])
    before = computed["NGPDASH03"]["pump"]["forecast"]["days_to_refill_deadline"]
    assert moved["pump"]["forecast"]["days_to_refill_deadline"] == pytest.approx(
        before - 1, abs=0.011
    )


async def test_a_stale_row_is_not_served(api: Api, w: World, pool: asyncpg.Pool) -> None:
    serial, patient_id = w.a.serial, w.a.patient_id
    # a reason no battery of these pumps gives: the mark of the row being served
    mark = "UPDATE pump_forecasts SET deadline_reason = 'battery' WHERE serial = $1"

    async def reason() -> str:
        found = await dashboard(api, w.a.clinician, patient_id)
        return str(found["pump"]["forecast"]["refill_deadline_reason"])

    await sweep(pool)
    await pool.execute(mark, serial)
    assert await reason() == "battery"  # fresh: served
    # a refill over HTTP: the trigger makes the row stale, the answer is the snapshot's
    await refill_over_http(api, w.a.clinician, serial)
    assert await reason() != "battery"
    found = await dashboard(api, w.a.clinician, patient_id)
    assert found["last_refill"]["added_ml"] == 38.0
    assert found["pump"]["forecast"]["volume_ml"] == 38.0
    # evaluated again and marked; a reading the engine has not seen leaves the row behind
    await engine(pool).evaluate([serial])
    await pool.execute(mark, serial)
    assert await reason() == "battery"
    async with pool.acquire() as conn:
        await fx.reading(conn, serial, datetime.now(UTC), volume_ml=30.0)
    assert await reason() != "battery"
    # evaluated and marked again; the pump moves to another patient of the clinic
    await engine(pool).evaluate([serial])
    await pool.execute(mark, serial)
    assert await reason() == "battery"
    async with pool.acquire() as conn:
        other = await fx.patient(conn, w.a.id)
        await fx.pump(conn, serial, patient_id=other)
    assert not (await row(pool, serial))["fresh"]
    moved = await dashboard(api, w.a.clinician, other)
    assert moved["pump"]["serial"] == serial
    assert moved["pump"]["forecast"]["refill_deadline_reason"] != "battery"


async def pump(api: Api, key: str, serial: str) -> dict[str, Any]:
    found = await api.call("GET", f"/v1/pumps/{serial}", key)
    assert found.status_code == 200, found.text
    answer: dict[str, Any] = found.json()
    return answer


async def pumps_listed(api: Api, key: str) -> dict[str, dict[str, Any]]:
    """Every page of `GET /v1/pumps` (three a page: fresh and stale rows share pages)."""
    found: dict[str, dict[str, Any]] = {}
    cursor: str | None = None
    while True:
        params = {"limit": 3} | ({} if cursor is None else {"cursor": cursor})
        page = await api.call("GET", "/v1/pumps", key, params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        found.update((item["serial"], item) for item in body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return found


async def test_the_pump_reads_from_fresh_rows_equal_those_from_the_snapshot(
    api: Api, w: World, pool: asyncpg.Pool
) -> None:
    made = [*await varied(pool, w.a.id), w.a.serial, w.b.serial]
    async with pool.acquire() as conn:  # messages lost for good: the gaps the row path reads
        await conn.execute(
            "INSERT INTO sequence_gaps (serial, source_id, first_missing, last_missing, state, "
            "unrecoverable_at, before_at, after_at) VALUES ($1, '', 40, 44, 'unrecoverable', "
            "now(), now() - interval '3 days', now() - interval '2 days')",
            "NGPDASH02",
        )
    listed = await pumps_listed(api, w.admin)
    serials = sorted(listed)  # the world's unassigned pump too
    assert set(made) < set(serials)
    computed = {s: await pump(api, w.admin, s) for s in serials}
    await sweep(pool)
    assert [s for s in serials if not (await row(pool, s))["fresh"]] == []
    for serial in serials:
        alike(computed[serial], await pump(api, w.admin, serial), serial)
    for serial, item in (await pumps_listed(api, w.admin)).items():
        alike(listed[serial], item, f"list {serial}")
    assert computed["NGPDASH02"]["forecast"]["refill_deadline_reason"] == "battery"
    assert computed["NGPDASH02"]["unrecovered_gaps"]["missing_messages"] == 5
    assert computed["NGPDASH03"]["therapy"]["schedule"]
    assert computed["NGPDASH03"]["volume_now_ml"] < computed["NGPDASH03"]["volume_ml"]
    # The pump reads read the row: a row moved by hand moves both answers.
    await pool.execute(
        "UPDATE pump_forecasts SET deadline_at = deadline_at - interval '1 day' "
        "WHERE serial = 'NGPDASH03'"
    )
    before = computed["NGPDASH03"]["forecast"]["days_to_refill_deadline"]
    moved = (await pump(api, w.admin, "NGPDASH03"))["forecast"]
    assert moved["days_to_refill_deadline"] == pytest.approx(before - 1, abs=0.011)
    moved = (await pumps_listed(api, w.admin))["NGPDASH03"]["forecast"]
    assert moved["days_to_refill_deadline"] == pytest.approx(before - 1, abs=0.011)


async def test_the_pump_reads_never_serve_a_stale_row(
    api: Api, w: World, pool: asyncpg.Pool
) -> None:
    serial = w.a.serial
    # a reason no battery of these pumps gives: the mark of the row being served
    mark = "UPDATE pump_forecasts SET deadline_reason = 'battery' WHERE serial = $1"

    async def reasons() -> tuple[str, str]:
        one = await pump(api, w.a.clinician, serial)
        listed = (await pumps_listed(api, w.a.clinician))[serial]
        return (
            str(one["forecast"]["refill_deadline_reason"]),
            str(listed["forecast"]["refill_deadline_reason"]),
        )

    await sweep(pool)
    await pool.execute(mark, serial)
    assert await reasons() == ("battery", "battery")  # fresh: served
    # a reading the engine has not evaluated yet: the snapshot's, with that reading's volume
    async with pool.acquire() as conn:
        await fx.reading(conn, serial, datetime.now(UTC), volume_ml=30.0)
    assert "battery" not in await reasons()
    assert (await pump(api, w.a.clinician, serial))["volume_ml"] == 30.0
    # evaluated and marked again; a refill over HTTP makes the row stale (its trigger)
    await engine(pool).evaluate([serial])
    await pool.execute(mark, serial)
    assert await reasons() == ("battery", "battery")
    await refill_over_http(api, w.a.clinician, serial)
    assert "battery" not in await reasons()
    assert (await pump(api, w.a.clinician, serial))["forecast"]["volume_ml"] == 38.0
