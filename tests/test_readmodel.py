"""The pump forecast read model (pump_forecasts) on a real database: the alert engine writes it,
the worklist reads it, and it stays right across sweeps, new readings, refills, bookings,
custody changes and pumps the engine has not evaluated yet."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from lab.embedded import EmbeddedBroker
from services.alerts.engine import Engine
from services.alerts.metrics import AlertsMetrics
from services.domain.alerting import RuleSettings
from services.domain.notifications import NotificationSettings
from services.notify import digest
from services.storage import channels, forecasts
from services.storage.database import prepare_connection
from services.storage.snapshots import load
from tests import alert_fixtures as fx
from tests.api_support import ADMIN_TOKEN, Api, World
from tests.support import alerts_process

DUE = "/v1/refills/due"


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    found = await asyncpg.create_pool(database_url, min_size=1, max_size=2, init=prepare_connection)
    assert found is not None
    yield found
    await found.close()


def engine(pool: asyncpg.Pool) -> Engine:
    return Engine(
        pool,
        settings=RuleSettings(),
        flap_window=timedelta(hours=6),
        data_clock=False,
        metrics=AlertsMetrics(),
    )


async def sweep(pool: asyncpg.Pool) -> None:
    """What the engine's sweep does: evaluate every pump."""
    serials = [r["serial"] for r in await pool.fetch("SELECT serial FROM pumps ORDER BY serial")]
    result = await engine(pool).evaluate(serials)
    assert result.failed == []


async def row(pool: asyncpg.Pool, serial: str) -> asyncpg.Record:
    found = await pool.fetchrow(
        "SELECT *, evaluated_version = version AS fresh FROM pump_forecasts WHERE serial = $1",
        serial,
    )
    assert found is not None, serial
    return found


async def refill_over_http(api: Api, key: str, serial: str) -> None:
    """A refill of 38 mL recorded through the API (the refill's trigger makes the row stale)."""
    refilled = await api.call(
        "POST",
        f"/v1/pumps/{serial}/refills",
        key,
        json={
            "refill": {
                "residual_ml": 2.6,
                "added_ml": 38.0,
                "drug": "baclofen",
                "concentration_mcg_per_ml": 2000,
            }
        },
    )
    assert refilled.status_code == 201, refilled.text


async def due(api: Api, key: str, **params: Any) -> list[dict[str, Any]]:
    found = await api.call("GET", DUE, key, params={"within_days": 100, **params})
    assert found.status_code == 200, found.text
    items: list[dict[str, Any]] = found.json()["items"]
    return items


async def pump_due_in(pool: asyncpg.Pool, clinic_id: str, serial: str, days: float) -> str:
    """A pump of the clinic whose reservoir reaches its 2 mL alarm ``days`` from now."""
    async with pool.acquire() as conn:
        patient_id = await fx.patient(conn, clinic_id)
        await fx.pump(conn, serial, patient_id=patient_id)
        await fx.reading(
            conn,
            serial,
            datetime.now(UTC) - timedelta(minutes=5),
            volume_ml=2.0 + 0.2 * days + 0.2 * 5 / 1440,
        )
    return patient_id


def same_items(left: list[dict[str, Any]], right: list[dict[str, Any]]) -> None:
    """Two answers of the worklist alike but for what the clock moved between them (and the
    alerts, which the engine changes: tests look at them on their own)."""
    assert [i["serial"] for i in left] == [i["serial"] for i in right]
    for a, b in zip(left, right, strict=True):
        moving = {"days_left", "days_to_refill_deadline", "volume_now_ml"}
        apart = {*moving, "open_alerts"}
        assert {k: v for k, v in a.items() if k not in apart} == {
            k: v for k, v in b.items() if k not in apart
        }
        for key in moving:
            if a[key] is None:
                assert b[key] is None
            else:
                assert b[key] == pytest.approx(a[key], abs=0.011)


async def test_the_engine_writes_the_row_the_worklist_reads(
    api: Api, w: World, pool: asyncpg.Pool
) -> None:
    await pump_due_in(pool, w.a.id, "NGPRM0001", 5)
    assert not (await row(pool, "NGPRM0001"))["fresh"]  # a new pump: not evaluated yet
    computed = await due(api, w.a.clinician)
    assert "NGPRM0001" in [i["serial"] for i in computed]
    await sweep(pool)
    written = await row(pool, "NGPRM0001")
    assert written["fresh"]
    assert written["deadline_reason"] == "low_alarm"
    assert str(written["clinic_id"]) == w.a.id
    assert (written["open_alerts"], written["highest_priority"]) == (1, "medium")  # refill_due
    assert written["last_contact_at"] is not None
    read = await due(api, w.a.clinician)
    same_items(computed, read)  # the row answers what the snapshot did
    assert read[0]["serial"] == "NGPRM0001"
    assert read[0]["open_alerts"][0]["rule"] == "refill_due"
    # The worklist reads the row, not a snapshot: a row moved by hand moves the answer.
    await pool.execute(
        "UPDATE pump_forecasts SET deadline_at = deadline_at - interval '1 day' "
        "WHERE serial = 'NGPRM0001'"
    )
    moved = await due(api, w.a.clinician)
    assert moved[0]["days_to_refill_deadline"] == pytest.approx(4.0, abs=0.01)
    fleet = await due(api, w.fleet)
    assert {i["serial"] for i in fleet} >= {"NGPRM0001", w.a.serial, w.b.serial}
    assert all(i["patient"] is None for i in fleet)


async def test_sweeps_keep_the_row_and_its_alert_summary(
    api: Api, w: World, pool: asyncpg.Pool
) -> None:
    await pump_due_in(pool, w.a.id, "NGPRM0002", 1.5)
    await sweep(pool)
    first = await row(pool, "NGPRM0002")
    assert (first["open_alerts"], first["highest_priority"]) == (1, "high")
    await sweep(pool)
    again = await row(pool, "NGPRM0002")
    assert again["fresh"]
    assert again["deadline_at"] == first["deadline_at"]
    assert again["evaluated_at"] >= first["evaluated_at"]
    assert (again["open_alerts"], again["highest_priority"]) == (1, "high")


async def test_a_new_reading_reaches_the_row_when_the_engine_evaluates_it(
    api: Api, w: World, pool: asyncpg.Pool
) -> None:
    await pump_due_in(pool, w.a.id, "NGPRM0003", 40)
    await sweep(pool)
    before = await row(pool, "NGPRM0003")
    async with pool.acquire() as conn:  # the reservoir falls faster than programmed
        await fx.reading(conn, "NGPRM0003", datetime.now(UTC) - timedelta(minutes=1), volume_ml=4)
    await engine(pool).evaluate(["NGPRM0003"])  # as ingest's NOTIFY makes the service do
    after = await row(pool, "NGPRM0003")
    assert after["fresh"]
    assert after["deadline_at"] < before["deadline_at"] - timedelta(days=25)
    item = next(i for i in await due(api, w.a.clinician) if i["serial"] == "NGPRM0003")
    assert item["days_left"] == pytest.approx(10.0, abs=0.01)
    assert item["volume_now_ml"] == pytest.approx(4.0, abs=0.01)


async def test_a_refill_over_http_shows_at_once_and_the_engine_then_writes_it(
    api: Api, w: World, pool: asyncpg.Pool
) -> None:
    await pump_due_in(pool, w.a.id, "NGPRM0004", 3)
    await sweep(pool)
    assert (await due(api, w.a.clinician))[0]["serial"] == "NGPRM0004"
    await refill_over_http(api, w.a.clinician, "NGPRM0004")
    assert not (await row(pool, "NGPRM0004"))["fresh"]  # the refill's trigger
    computed = next(
        i for i in await due(api, w.a.clinician, within_days=400) if i["serial"] == "NGPRM0004"
    )
    assert computed["days_to_refill_deadline"] > 100  # full again: not due at the old date
    assert computed["last_refill_at"] is not None
    assert "NGPRM0004" not in [i["serial"] for i in await due(api, w.a.clinician)]
    await engine(pool).evaluate(["NGPRM0004"])
    assert (await row(pool, "NGPRM0004"))["fresh"]
    read = next(
        i for i in await due(api, w.a.clinician, within_days=400) if i["serial"] == "NGPRM0004"
    )
    same_items([computed], [read])


async def test_a_booking_shows_at_once_and_its_resolved_alert_after_the_engine(
    api: Api, w: World, pool: asyncpg.Pool
) -> None:
    await pump_due_in(pool, w.a.id, "NGPRM0005", 6)
    await sweep(pool)
    assert (await row(pool, "NGPRM0005"))["open_alerts"] == 1
    visit = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    booked = await api.call(
        "PUT",
        "/v1/pumps/NGPRM0005/refill-appointment",
        w.a.clinician,
        json={"scheduled_for": visit.isoformat()},
    )
    assert booked.status_code == 200, booked.text
    found = await row(pool, "NGPRM0005")
    assert found["fresh"]  # a booking does not move the forecast
    assert found["refill_appointment_at"] == visit
    item = next(i for i in await due(api, w.a.clinician) if i["serial"] == "NGPRM0005")
    assert datetime.fromisoformat(item["refill_appointment_at"]) == visit
    await engine(pool).evaluate(["NGPRM0005"])
    assert (await row(pool, "NGPRM0005"))["open_alerts"] == 0  # refill_due resolved
    item = next(i for i in await due(api, w.a.clinician) if i["serial"] == "NGPRM0005")
    assert item["open_alerts"] == []


async def test_a_moved_pump_leaves_its_old_clinic_at_once_even_when_the_engine_races(
    api: Api, w: World, pool: asyncpg.Pool
) -> None:
    await pump_due_in(pool, w.a.id, "NGPRM0006", 4)
    await sweep(pool)
    assert "NGPRM0006" in [i["serial"] for i in await due(api, w.a.clinician)]
    # An evaluation that has read the pump when the move comes: the move waits for its commit
    # (the row is the evaluation's until then), and then leaves the row B's and stale.
    async with pool.acquire() as conn:
        async with conn.transaction():
            now = datetime.now(UTC)
            seen = await forecasts.versions(conn, ["NGPRM0006"])
            loaded = await load(conn, ["NGPRM0006"], now=now, wall_now=now, settings=RuleSettings())
            move = asyncio.create_task(
                api.call("PUT", "/v1/pumps/NGPRM0006", ADMIN_TOKEN, json={"clinic_id": w.b.id})
            )
            await waiting_on_a_lock(pool, move)
            await forecasts.write(conn, [forecasts.of(loaded["NGPRM0006"][0])], seen, wall_now=now)
        moved = await move
    assert moved.status_code == 200, moved.text
    found = await row(pool, "NGPRM0006")
    assert str(found["clinic_id"]) == w.b.id  # the evaluation did not give it back
    assert found["patient_id"] is None
    assert not found["fresh"]  # it computed A's forecast: B's zone and settings may differ
    assert "NGPRM0006" not in [i["serial"] for i in await due(api, w.a.clinician)]
    assert "NGPRM0006" in [i["serial"] for i in await due(api, w.b.clinician)]
    await sweep(pool)
    assert (await row(pool, "NGPRM0006"))["fresh"]
    assert "NGPRM0006" not in [i["serial"] for i in await due(api, w.a.clinician)]
    assert "NGPRM0006" in [i["serial"] for i in await due(api, w.b.clinician)]
    assert all(
        i["patient"] is None or i["patient"]["clinic_id"] == w.b.id
        for i in await due(api, w.b.clinician)
    )


async def waiting_on_a_lock(pool: asyncpg.Pool, task: asyncio.Task[Any]) -> None:
    """Until another backend of this database waits for a row lock (the task's request)."""
    deadline = time.monotonic() + 30
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'"
    )
    while not await pool.fetchval(query):
        assert not task.done(), task.result().text
        assert time.monotonic() < deadline, "the move never waited for the evaluation"
        await asyncio.sleep(0.02)


async def test_pages_merge_evaluated_and_unevaluated_pumps_in_deadline_order(
    api: Api, w: World, pool: asyncpg.Pool
) -> None:
    for n, days in enumerate((9, 2, 7, 4, 11, 6)):
        await pump_due_in(pool, w.a.id, f"NGPRM01{n:02d}", days)
    await sweep(pool)
    # Two pumps the engine has not seen since: one new, one whose patient's margin changed.
    await pump_due_in(pool, w.a.id, "NGPRM0200", 5)
    margin = await pool.fetchval("SELECT patient_id FROM pumps WHERE serial = 'NGPRM0102'")
    await pool.execute("UPDATE patients SET low_alarm_margin_ml = 3.0 WHERE id = $1", margin)
    assert not (await row(pool, "NGPRM0102"))["fresh"]
    whole = await due(api, w.a.clinician, limit=500)
    deadlines = [i["refill_deadline_at"] for i in whole]
    assert deadlines == sorted(deadlines)
    serials = [i["serial"] for i in whole]
    assert {"NGPRM0200", "NGPRM0102", w.a.serial} <= set(serials)
    margined = next(i for i in whole if i["serial"] == "NGPRM0102")
    assert margined["days_left"] == pytest.approx(7 - 5, abs=0.01)  # 1 mL more at 0.2 mL/day
    paged: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"within_days": 100, "limit": 2}
        if cursor:
            params["cursor"] = cursor
        found = await api.call("GET", DUE, w.a.clinician, params=params)
        assert found.status_code == 200, found.text
        paged += [i["serial"] for i in found.json()["items"]]
        cursor = found.json()["next_cursor"]
        if cursor is None:
            break
    assert paged == serials


async def test_clinic_settings_make_rows_stale_until_the_engine_applies_them(
    api: Api, w: World, pool: asyncpg.Pool
) -> None:
    await pump_due_in(pool, w.a.id, "NGPRM0007", 6)
    await sweep(pool)
    assert (await row(pool, "NGPRM0007"))["open_alerts"] == 1  # refill due within 7 days
    before = next(i for i in await due(api, w.a.clinician) if i["serial"] == "NGPRM0007")
    changed = await api.call(
        "PUT",
        f"/v1/clinics/{w.a.id}/alert-settings",
        w.a.clinician,
        json={"refill_due_low_days": 3, "refill_due_medium_days": 2, "refill_due_high_days": 1},
    )
    assert changed.status_code == 200, changed.text
    assert not (await row(pool, "NGPRM0007"))["fresh"]
    during = next(i for i in await due(api, w.a.clinician) if i["serial"] == "NGPRM0007")
    same_items([before], [during])
    await engine(pool).evaluate(["NGPRM0007"])
    found = await row(pool, "NGPRM0007")
    assert found["fresh"]
    assert (found["open_alerts"], found["highest_priority"]) == (0, None)


async def test_the_digest_reads_the_rows_and_forecasts_the_stale_ones(
    api: Api, w: World, pool: asyncpg.Pool
) -> None:
    await pump_due_in(pool, w.a.id, "NGPRM0008", 3)
    await pump_due_in(pool, w.a.id, "NGPRM0009", 5)
    await sweep(pool)
    # The digest reads the row: one moved by hand beyond the horizon leaves the list.
    await pool.execute(
        "UPDATE pump_forecasts SET low_alarm_at = low_alarm_at + interval '30 days' "
        "WHERE serial = 'NGPRM0009'"
    )
    await pump_due_in(pool, w.a.id, "NGPRM0010", 4)  # new: not evaluated yet
    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        found = await digest.compose(
            conn,
            clinic_id=w.a.id,
            clinic_name="Clinic A",
            settings=NotificationSettings.stored({}),
            tz=UTC,
            day=now.date(),
            now=now,
            rule_settings=RuleSettings(),
        )
    listed = [r["serial"] for r in found.data["refills"]]
    assert listed == ["NGPRM0008", "NGPRM0010"]
    assert found.data["refills"][0]["days_to_low_alarm"] == pytest.approx(3.0, abs=0.01)


async def listened(pool: asyncpg.Pool, statement: str, *args: Any) -> list[str]:
    """The payloads on the alert service's channel that ``statement``'s commit sends."""
    heard: asyncio.Queue[str] = asyncio.Queue()
    async with pool.acquire() as listener:

        def note(conn: Any, pid: int, channel: str, payload: object) -> None:
            heard.put_nowait(str(payload))

        await listener.add_listener(channels.INGEST, note)
        try:
            await pool.execute(statement, *args)
            # A marker sent after the statement's commit: what came before it is everything.
            await pool.execute("SELECT pg_notify($1, 'marker')", channels.INGEST)
            found = []
            while (payload := await asyncio.wait_for(heard.get(), 30)) != "marker":
                found.append(payload)
        finally:
            await listener.remove_listener(channels.INGEST, note)
    return found


async def test_a_settings_change_notifies_the_alert_service_of_the_pumps_it_made_stale(
    w: World, pool: asyncpg.Pool
) -> None:
    """Issue 20, migration 0016: the triggers that mark forecasts stale also wake the engine
    for those pumps, in channels.pumps_changed's payload; a big clinic's list is too long to
    send, so it says "re-read them all"; nothing relevant changed, nothing is sent."""
    patient_id = await pump_due_in(pool, w.a.id, "NGPRM0301", 5)
    async with pool.acquire() as conn:
        await fx.pump(conn, "NGPRM0302", patient_id=patient_id)  # a second pump in her
    margin = "UPDATE patients SET low_alarm_margin_ml = $2 WHERE id = $1"
    heard = await listened(pool, margin, uuid.UUID(patient_id), 3.0)
    assert heard == [channels.pumps_changed_payload(["NGPRM0301", "NGPRM0302"])]
    assert await listened(pool, margin, uuid.UUID(patient_id), 3.0) == []  # the same margin
    risk = "UPDATE patients SET withdrawal_risk = 'high' WHERE id = $1"
    assert await listened(pool, risk, uuid.UUID(patient_id)) == [
        channels.pumps_changed_payload(["NGPRM0301", "NGPRM0302"])
    ]
    held = await pool.fetch(
        "SELECT serial FROM pumps WHERE clinic_id = $1 ORDER BY serial", uuid.UUID(w.a.id)
    )
    zone = "UPDATE clinics SET timezone = 'Asia/Tokyo' WHERE id = $1"
    assert await listened(pool, zone, uuid.UUID(w.a.id)) == [
        channels.pumps_changed_payload([r["serial"] for r in held])
    ]
    named = "UPDATE clinics SET name = 'Renamed' WHERE id = $1"
    assert await listened(pool, named, uuid.UUID(w.a.id)) == []
    nobody = await pool.fetchval(
        "INSERT INTO patients (clinic_id, mrn, display_name) VALUES ($1, 'MRN-NONE', 'N') "
        "RETURNING id",
        uuid.UUID(w.a.id),
    )
    assert await listened(pool, margin, nobody, 4.0) == []  # no pump: no one to wake
    # 600 pumps in clinic B: their list is past the payload limit.
    await pool.execute(
        "INSERT INTO pumps (serial, clinic_id) "
        "SELECT 'NGPBIG' || lpad(n::text, 5, '0'), $1 FROM generate_series(1, 600) n",
        uuid.UUID(w.b.id),
    )
    many = await pool.fetch(
        "SELECT serial FROM pumps WHERE clinic_id = $1 ORDER BY serial", uuid.UUID(w.b.id)
    )
    assert channels.pumps_changed_payload([r["serial"] for r in many]) == '{"serials": null}'
    settings = "UPDATE clinics SET alert_settings = '{\"refill_due_low_days\": 3}' WHERE id = $1"
    assert await listened(pool, settings, uuid.UUID(w.b.id)) == ['{"serials": null}']
    stale = await pool.fetchval(
        "SELECT count(*) FROM pump_forecasts WHERE clinic_id = $1 AND stale", uuid.UUID(w.b.id)
    )
    assert stale == len(many)


async def test_a_clinics_new_lead_time_reaches_its_alerts_without_a_sweep(
    api: Api, w: World, pool: asyncpg.Pool, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Issue 20: the alert service as a process, its sweep a day apart (it sweeps at start
    only), so that only the wake can explain what follows. A clinic raises its refill lead time
    over the API: the refill alert opens and the row is fresh again; it lowers it: the alert
    resolves; a patient's margin is raised (no route sets it: an operator's SQL, the same
    trigger): the forecast's deadline moves."""
    serial = "NGPRM0401"
    patient_id = await pump_due_in(pool, w.a.id, serial, 20)  # beyond the 14-day lead time

    async def state() -> tuple[asyncpg.Record, str | None]:
        found = await row(pool, serial)
        status = await pool.fetchval(
            "SELECT priority FROM alerts WHERE serial = $1 AND rule = 'refill_due' "
            "AND status <> 'resolved'",
            serial,
        )
        return found, status

    async def until(what: str, check: Callable[[asyncpg.Record, str | None], bool]) -> Any:
        deadline = time.monotonic() + 60
        while not check(*(found := await state())):
            assert time.monotonic() < deadline, f"{what}: {dict(found[0])}, alert {found[1]}"
            await asyncio.sleep(0.05)
        return found[0]

    async def lead_time(days: float) -> None:
        changed = await api.call(
            "PUT",
            f"/v1/clinics/{w.a.id}/alert-settings",
            w.a.clinician,
            json={"refill_due_low_days": days},
        )
        assert changed.status_code == 200, changed.text

    alerts = alerts_process(
        api.database_url,
        broker,
        tmp_path / "alerts.log",
        PUMPWATCH_ALERTS_SWEEP_INTERVAL_S="86400",
        PUMPWATCH_NOTIFY_ENABLED="false",
    )
    try:
        alerts.start()
        first = await until("evaluated at start", lambda r, a: r["fresh"] and a is None)
        await lead_time(30)
        await until("raised: the alert opens", lambda r, a: r["fresh"] and a == "low")
        await lead_time(10)
        await until("lowered: it resolves", lambda r, a: r["fresh"] and a is None)
        await pool.execute(
            "UPDATE patients SET low_alarm_margin_ml = 3.0 WHERE id = $1", uuid.UUID(patient_id)
        )
        moved = await until(
            "the margin moves the deadline",
            lambda r, a: r["fresh"] and r["deadline_at"] != first["deadline_at"],
        )
        earlier = first["deadline_at"] - moved["deadline_at"]
        assert abs(earlier - timedelta(days=5)) < timedelta(minutes=1)  # 1 mL at 0.2 mL/day
        # At start and when it began listening (anything missed meanwhile), never since.
        assert alerts.metric("pumpwatch_alerts_sweeps_total") <= 2
        assert alerts.metric("pumpwatch_alerts_notifications_total") >= 3
    finally:
        alerts.stop_quietly()
