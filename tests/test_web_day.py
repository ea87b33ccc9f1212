"""The clinic's day in the dashboard, page by page over the app's ASGI stack on a real
PostgreSQL: the patient list and new-patient form, claiming, assigning and moving a pump, booking
the refill visit in the clinic's zone, and the guided refill with its verdict. Each action goes
through the API's own route (its transaction, outbox, history and audit rows, naming the signed-in
person), refuses in words on the form, needs the session's CSRF token, and shows another clinic
nothing."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest

from services.api import passwords
from services.api.auth import Principal
from services.api.web.patients import pumps_by_patient
from services.storage.database import prepare_connection
from tests import alert_fixtures as fx
from tests.api_support import ADMIN_TOKEN, Api, running_api
from tests.notify_support import evaluate

PASSWORD = "walnut harbour lantern 31"
NURSE_A, NURSE_B = "nora@north.example", "sam@south.example"
SERIAL_A, SERIAL_A2, SERIAL_B, SERIAL_NEW = "NGPDAYA01", "NGPDAYA02", "NGPDAYB01", "NGPDAYNEW1"
SERIAL_SMALL = "NGPDAYA05"
"""Clinic A's 20 mL pump."""
CODE = "K7Q2M9"
BERLIN = ZoneInfo("Europe/Berlin")


@dataclass
class Day:
    api: Api
    a: str
    b: str
    ada: str
    """Clinic A's patient with a pump running for 60 days since its last refill."""
    ben: str
    """Clinic A's patient without a pump."""
    dee: str
    cy: str
    """Clinic B's patient."""
    nurse_a: uuid.UUID

    async def sql(self, statement: str, *args: object) -> list[asyncpg.Record]:
        conn = await self.api.conn()
        try:
            return list(await conn.fetch(statement, *args))
        finally:
            await conn.close()

    @asynccontextmanager
    async def signed_in(self, email: str) -> AsyncIterator[Browser]:
        transport = httpx.ASGITransport(app=self.api.app, client=("192.0.2.30", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            form = await client.get("/login")
            token = _csrf(form.text)
            signed = await client.post(
                "/login", data={"email": email, "password": PASSWORD, "csrf_token": token}
            )
            assert signed.status_code == 303, signed.text
            yield Browser(client, _csrf((await client.get("/")).text))


@dataclass
class Browser:
    client: httpx.AsyncClient
    csrf: str

    async def post(self, path: str, **data: str) -> httpx.Response:
        return await self.client.post(path, data={"csrf_token": self.csrf, **data})

    async def get(self, path: str, **params: str) -> httpx.Response:
        return await self.client.get(path, params=params)


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found is not None
    return found[1]


async def _running_pump(
    conn: asyncpg.Connection, serial: str, patient: str | None, *, capacity_ml: float = 40.0
) -> None:
    """A 40 mL pump (or ``capacity_ml``) refilled with 18.5 mL 60 days ago, delivering
    0.25 mL/day since."""
    await fx.pump(conn, serial, patient_id=patient)
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    refill_at = now - timedelta(days=60)
    await fx.reading(
        conn, serial, refill_at - timedelta(hours=6), volume_ml=3.0, capacity_ml=capacity_ml
    )
    await fx.refill_event(conn, serial, refill_at, residual_ml=1.5, added_ml=18.5)
    for hours in range(60 * 24 - 6, -1, -24):
        volume = 18.5 - 0.25 * (60 * 24 - hours) / 24
        await fx.reading(
            conn, serial, now - timedelta(hours=hours), volume_ml=round(volume, 3),
            rate_ml_per_day=0.25, capacity_ml=capacity_ml,
        )  # fmt: skip


@pytest.fixture
async def day(database_url: str) -> AsyncIterator[Day]:
    async with running_api(database_url, api_auth_failures_per_minute=10_000) as api:
        conn = await api.conn()
        try:
            a = await fx.clinic(conn, name="North", timezone="Europe/Berlin")
            b = await fx.clinic(conn, name="South", timezone="America/New_York")
            ada = await fx.patient(conn, a, mrn="MRN-A1")
            await conn.execute(
                "UPDATE patients SET display_name = 'Ada Soon' WHERE id = $1", uuid.UUID(ada)
            )
            ben = await fx.patient(conn, a, mrn="MRN-A2")
            await conn.execute(
                "UPDATE patients SET display_name = 'Ben Later' WHERE id = $1", uuid.UUID(ben)
            )
            dee = await fx.patient(conn, a, mrn="MRN-A4")
            await conn.execute(
                "UPDATE patients SET display_name = 'Dee Third' WHERE id = $1", uuid.UUID(dee)
            )
            cy = await fx.patient(conn, b, mrn="MRN-B1")
            await conn.execute(
                "UPDATE patients SET display_name = 'Cy Other' WHERE id = $1", uuid.UUID(cy)
            )
            await _running_pump(conn, SERIAL_A, ada)
            await _running_pump(conn, SERIAL_B, cy)
            fay = await fx.patient(conn, a, mrn="MRN-A5")
            await _running_pump(conn, SERIAL_SMALL, fay, capacity_ml=20.0)
            # A pump provisioned to clinic A, not yet in a patient; one nobody holds.
            await fx.pump(conn, SERIAL_A2)
            await conn.execute(
                "UPDATE pumps SET clinic_id = $1 WHERE serial = $2", uuid.UUID(a), SERIAL_A2
            )
            await fx.pump(conn, SERIAL_NEW)
            await fx.reading(conn, SERIAL_NEW, datetime.now(UTC) - timedelta(hours=1))
            hashed = passwords.hash_password(PASSWORD)
            ids = {}
            for email, name, home in ((NURSE_A, "Nora Nurse", a), (NURSE_B, "Sam South", b)):
                ids[email] = await conn.fetchval(
                    "INSERT INTO users (email, display_name, role, clinic_id, password_hash, "
                    "created_by) VALUES ($1, $2, 'clinician', $3, $4, 'test') RETURNING id",
                    email,
                    name,
                    uuid.UUID(home),
                    hashed,
                )
        finally:
            await conn.close()
        yield Day(api, a, b, ada, ben, dee, cy, ids[NURSE_A])


async def _claim_code(day: Day, code: str = CODE, *, minutes: float = 30) -> None:
    now = datetime.now(UTC)
    conn = await day.api.conn()
    try:
        await fx.claim_event(
            conn, SERIAL_NEW, code, recorded_at=now, expires_at=now + timedelta(minutes=minutes)
        )
    finally:
        await conn.close()


async def _audited(day: Day, resource_type: str) -> list[asyncpg.Record]:
    return await day.sql(
        "SELECT action, resource_id, status FROM audit_log WHERE user_id = $1 "
        "AND resource_type = $2 AND action LIKE 'post %' AND status < 300 ORDER BY id",
        day.nurse_a,
        resource_type,
    )


async def test_the_patient_list_searches_and_registers_with_errors_in_words(day: Day) -> None:
    async with day.signed_in(NURSE_A) as nora:
        listed = await nora.get("/patients")
        assert listed.status_code == 200
        assert "Ada Soon" in listed.text
        assert "Ben Later" in listed.text
        assert "Cy Other" not in listed.text  # another clinic's
        assert SERIAL_A in listed.text
        found = await nora.get("/patients", q="mrn-a2")
        assert "Ben Later" in found.text
        assert "Ada Soon" not in found.text
        none = await nora.get("/patients", q="Cy")
        assert "Cy Other" not in none.text
        assert "No patient's name or MRN contains" in none.text

        empty = await nora.post("/patients", display_name="", mrn="")
        assert empty.status_code == 422
        assert "The patient was not registered" in empty.text
        assert "Name: required" in empty.text
        assert "MRN: required" in empty.text
        margin = await nora.post(
            "/patients", display_name="Dora New", mrn="MRN-A3", low_alarm_margin_ml="200"
        )
        assert margin.status_code == 422
        assert "Personal low alarm: Input should be less than or equal to 100" in margin.text
        assert 'value="Dora New"' in margin.text  # what was typed stays on the form
        taken = await nora.post("/patients", display_name="Dora New", mrn="MRN-A1")
        assert taken.status_code == 409
        assert "already has a patient with MRN" in taken.text

        made = await nora.post(
            "/patients",
            display_name="Dora New",
            mrn="MRN-A3",
            birth_date="1971-04-02",
            withdrawal_risk="high",
            low_alarm_margin_ml="4",
        )
        assert made.status_code == 303
        page = await nora.get(made.headers["location"])
        assert "Dora New" in page.text
        assert "withdrawal risk high" in page.text
    rows = await day.sql("SELECT clinic_id, low_alarm_margin_ml FROM patients WHERE mrn = 'MRN-A3'")
    assert [(str(r["clinic_id"]), r["low_alarm_margin_ml"]) for r in rows] == [(day.a, 4.0)]
    assert [r["status"] for r in await _audited(day, "patients")] == [201]


async def test_a_pump_is_claimed_with_its_code_assigned_and_moved(day: Day) -> None:
    await _claim_code(day)
    async with day.signed_in(NURSE_A) as nora:
        form = await nora.get("/pumps/assign", patient_id=day.ben)
        assert form.status_code == 200
        assert f'<option value="{SERIAL_A2}"' in form.text  # provisioned, not assigned
        assert SERIAL_B not in form.text
        assert "Cy Other" not in form.text

        wrong = await nora.post(
            "/pumps/assign", serial=SERIAL_NEW, claim_code="WRONG1", patient_id=day.ben
        )
        assert wrong.status_code == 403
        assert "Claim code refused" in wrong.text
        assert "read the code from the programmer again" in wrong.text
        theirs = await nora.post(
            "/pumps/assign", serial=SERIAL_B, claim_code=CODE, patient_id=day.ben
        )
        assert theirs.status_code == 404
        assert f"No pump {SERIAL_B} is known to your clinic" in theirs.text
        nameless = await nora.post("/pumps/assign", serial=SERIAL_A2, patient_id="")
        assert nameless.status_code == 422
        assert "Choose the patient" in nameless.text
        bad = await nora.post("/pumps/assign", serial="x", claim_code=CODE, patient_id=day.ben)
        assert "serial number" in bad.text

        claimed = await nora.post(
            "/pumps/assign", serial=SERIAL_NEW.lower(), claim_code="k7q-2m9", patient_id=day.ben
        )
        assert claimed.status_code == 303, claimed.text
        assert claimed.headers["location"] == f"/patients/{day.ben}"
        page = await nora.get(f"/patients/{day.ben}")
        assert f"Pump {SERIAL_NEW}" in page.text
        # Moved to another patient of the clinic; the provisioned pump goes to Ben instead.
        moved = await nora.post("/pumps/assign", serial=SERIAL_NEW, patient_id=day.dee)
        assert moved.status_code == 303
        assigned = await nora.post("/pumps/assign", serial=SERIAL_A2, patient_id=day.ben)
        assert assigned.status_code == 303
        form = await nora.get("/pumps/assign")
        assert f"{SERIAL_NEW} — now in Dee Third" in form.text
    held = await day.sql(
        "SELECT how, patient_id FROM pump_assignments WHERE serial = $1 "
        "AND strpos(actor, $2) > 0 ORDER BY since, id",
        SERIAL_NEW,
        str(day.nurse_a),
    )  # the custody history names her
    assert [(r["how"], str(r["patient_id"])) for r in held] == [
        ("claimed", day.ben),
        ("moved", day.dee),
    ]
    # Giving the clinic's unassigned pump a patient completes its period (it was theirs).
    now_of_a2 = await day.sql(
        "SELECT patient_id FROM pump_assignments WHERE serial = $1 AND until IS NULL", SERIAL_A2
    )
    assert [str(r["patient_id"]) for r in now_of_a2] == [day.ben]
    assert await day.sql("SELECT 1 FROM claim_failures WHERE serial = $1", SERIAL_NEW)
    assert [r["status"] for r in await _audited(day, "pumps")] == [200, 200, 200]


async def test_a_visit_is_booked_changed_and_cancelled_in_the_clinics_zone(day: Day) -> None:
    soon = (datetime.now(BERLIN) + timedelta(days=3)).replace(
        hour=9, minute=30, second=0, microsecond=0
    )
    async with day.signed_in(NURSE_A) as nora:
        form = await nora.get(f"/pumps/{SERIAL_A}/visit", next="/")
        assert form.status_code == 200
        assert "Date and time (Europe/Berlin)" in form.text
        assert "Refill by" in form.text
        booked = await nora.post(
            f"/pumps/{SERIAL_A}/visit", when=f"{soon:%Y-%m-%dT%H:%M}", back="/", action="book"
        )
        assert booked.status_code == 303
        assert booked.headers["location"] == "/"
        rows = await day.sql("SELECT refill_appointment_at FROM pumps WHERE serial = $1", SERIAL_A)
        assert rows[0]["refill_appointment_at"] == soon.astimezone(UTC)
        worklist = await nora.get("/")
        assert f"{soon:%Y-%m-%d} 09:30 CE" in worklist.text  # CET or CEST: the zone named
        assert f"/pumps/{SERIAL_A}/visit?next=/" in worklist.text

        later = soon + timedelta(days=1, hours=2)
        back = f"/patients/{day.ada}#booking"
        changed = await nora.post(
            f"/pumps/{SERIAL_A}/visit", when=f"{later:%Y-%m-%dT%H:%M}", back=back
        )
        assert changed.headers["location"] == back
        page = await nora.get(f"/patients/{day.ada}")
        assert f"{later:%Y-%m-%d} 11:30 CE" in page.text
        assert "Change visit" in page.text

        past = await nora.post(f"/pumps/{SERIAL_A}/visit", when="2020-01-01T10:00")
        assert past.status_code == 422
        assert "That time has passed" in past.text
        gap = await nora.post(f"/pumps/{SERIAL_A}/visit", when="2030-03-31T02:30")
        assert gap.status_code == 422
        assert "does not exist in Europe/Berlin" in gap.text
        junk = await nora.post(f"/pumps/{SERIAL_A}/visit", when="tomorrow")
        assert "Enter the visit&#39;s date and time" in junk.text
        outside = await nora.post(f"/pumps/{SERIAL_A}/visit", when="x", back="https://evil.example")
        assert "evil.example" not in outside.text
        for elsewhere in ("//evil.example", "/\t/evil.example", "/\\evil.example", "/ok\n"):
            kept = await nora.post(f"/pumps/{SERIAL_A}/visit", when=f"{soon:%Y-%m-%dT%H:%M}",
                                   back=elsewhere)  # fmt: skip
            assert kept.headers["location"] == "/", elsewhere  # only this site's paths

        cancelled = await nora.post(f"/pumps/{SERIAL_A}/visit", action="cancel", back=back)
        assert cancelled.status_code == 303
        rows = await day.sql("SELECT refill_appointment_at FROM pumps WHERE serial = $1", SERIAL_A)
        assert rows[0]["refill_appointment_at"] is None
    assert [r["status"] for r in await _audited(day, "pumps")] == [200] * 7  # 3 + the 4 above


async def test_the_guided_refill_records_through_the_api_and_gives_the_verdict(day: Day) -> None:
    async with day.signed_in(NURSE_A) as nora:
        form = await nora.get(f"/pumps/{SERIAL_A}/refill")
        assert form.status_code == 200
        expected = re.search(r'id="expected-residual"><strong>([\d.]+) mL', form.text)
        assert expected is not None
        assert 3.0 < float(expected[1]) < 4.0  # 18.5 mL less 60 days at 0.25 mL/day
        assert "Refill by" in form.text
        msg_id = re.search(r'name="msg_id" value="([^"]+)"', form.text)
        assert msg_id is not None

        missing = await nora.post(f"/pumps/{SERIAL_A}/refill", msg_id=msg_id[1], drug="baclofen")
        assert missing.status_code == 422
        assert "Measured residual: required" in missing.text
        negative = await nora.post(
            f"/pumps/{SERIAL_A}/refill",
            msg_id=msg_id[1],
            residual_ml="-1",
            drug="baclofen",
            concentration_mcg_per_ml="2000",
            added_ml="20",
        )
        assert "Measured residual: Input should be greater than or equal to 0" in negative.text
        overfull = await nora.post(
            f"/pumps/{SERIAL_A}/refill",
            msg_id=msg_id[1],
            residual_ml="0.5",
            drug="baclofen",
            concentration_mcg_per_ml="2000",
            added_ml="45",
        )
        assert "more than the 40 mL reservoir holds" in overfull.text
        assert not await day.sql("SELECT 1 FROM events WHERE msg_id = $1", uuid.UUID(msg_id[1]))

        verdict = await nora.post(
            f"/pumps/{SERIAL_A}/refill",
            msg_id=msg_id[1],
            residual_ml="0,5",
            drug="baclofen",
            concentration_mcg_per_ml="2000",
            added_ml="20",
        )
        assert verdict.status_code == 200, verdict.text
        text = verdict.text
        assert "Discrepancy: less left than expected" in text
        assert "pocket fill" in text
        assert "2 mL for a 40 mL pump" in text
        assert "14.5 % of what should have been delivered" in text
        assert "Action: check the patient for signs of overdose" in text
        assert 'id="new-low-alarm"' in text
        assert "recorded by Nora Nurse" in text
        # The same form sent again records nothing twice.
        again = await nora.post(
            f"/pumps/{SERIAL_A}/refill",
            msg_id=msg_id[1],
            residual_ml="0.5",
            drug="baclofen",
            concentration_mcg_per_ml="2000",
            added_ml="20",
        )
        assert again.status_code == 200
    events = await day.sql(
        "SELECT source_kind, body FROM events WHERE msg_id = $1", uuid.UUID(msg_id[1])
    )
    assert len(events) == 1
    assert events[0]["source_kind"] == "http_api"
    outbox = await day.sql("SELECT payload FROM outbox WHERE event = 'refill.recorded'")
    assert len(outbox) == 1
    assert str(day.nurse_a) in str(outbox[0]["payload"])
    assert "over_delivery" in str(outbox[0]["payload"])
    audited = await _audited(day, "refills")
    assert [r["resource_id"] for r in audited if r["status"] == 201] == [msg_id[1]]


async def test_the_verdict_weighs_the_same_difference_by_the_pumps_size(day: Day) -> None:
    """1.3 mL less than expected (under 14.5 % of the 15 mL delivered): a discrepancy in a
    20 mL pump (over 1 mL), none in a 40 mL pump (2 mL)."""
    async with day.signed_in(NURSE_A) as nora:
        verdicts = {}
        for serial in (SERIAL_A, SERIAL_SMALL):
            form = await nora.get(f"/pumps/{serial}/refill")
            expected = re.search(r'id="expected-residual"><strong>([\d.]+) mL', form.text)
            assert expected is not None
            residual = float(expected[1]) - 1.3
            verdicts[serial] = (
                await nora.post(
                    f"/pumps/{serial}/refill",
                    msg_id=str(uuid.uuid4()),
                    residual_ml=f"{residual:.2f}",
                    drug="baclofen",
                    concentration_mcg_per_ml="2000",
                    added_ml="18",
                )
            ).text
    large, small = verdicts[SERIAL_A], verdicts[SERIAL_SMALL]
    assert "✓ No discrepancy" in large
    assert "2 mL for a 40 mL pump" in large
    assert "Action:" not in large
    assert "⚠ Discrepancy: less left than expected" in small
    assert "1 mL for a 20 mL pump" in small
    assert "Action: check the patient for signs of overdose" in small


async def test_every_action_needs_the_csrf_token(day: Day) -> None:
    await _claim_code(day)
    async with day.signed_in(NURSE_A) as nora:
        for path, data in (
            ("/patients", {"display_name": "Eve", "mrn": "MRN-X"}),
            ("/pumps/assign", {"serial": SERIAL_NEW, "claim_code": CODE, "patient_id": day.ben}),
            (f"/pumps/{SERIAL_A}/visit", {"when": "2030-01-02T10:00"}),
            (
                f"/pumps/{SERIAL_A}/refill",
                {"residual_ml": "1", "drug": "b", "concentration_mcg_per_ml": "1", "added_ml": "1"},
            ),
        ):
            for token in ({}, {"csrf_token": "guess"}):
                refused = await nora.client.post(path, data={**data, **token})
                assert refused.status_code == 403, path
    assert not await day.sql("SELECT 1 FROM patients WHERE mrn = 'MRN-X'")
    assert not await day.sql("SELECT 1 FROM pump_assignments WHERE serial = $1", SERIAL_NEW)
    assert not await day.sql(
        "SELECT 1 FROM events WHERE type = 'refill' AND source_kind = 'http_api'"
    )


async def test_another_clinic_sees_and_changes_none_of_it(day: Day) -> None:
    async with day.signed_in(NURSE_B) as sam:
        listed = await sam.get("/patients", q="Ada")
        assert "Ada Soon" not in listed.text
        assert "Ben Later" not in (await sam.get("/patients")).text
        form = await sam.get("/pumps/assign")
        assert SERIAL_A not in form.text
        assert SERIAL_A2 not in form.text
        for path in (f"/pumps/{SERIAL_A}/visit", f"/pumps/{SERIAL_A}/refill"):
            page = await sam.get(path)
            assert page.status_code == 404
            assert "Ada Soon" not in page.text
        booked = await sam.post(f"/pumps/{SERIAL_A}/visit", when="2030-01-02T10:00")
        assert booked.status_code == 404
        refill = await sam.post(
            f"/pumps/{SERIAL_A}/refill",
            residual_ml="1",
            drug="baclofen",
            concentration_mcg_per_ml="2000",
            added_ml="20",
            msg_id=str(uuid.uuid4()),
        )
        assert refill.status_code == 404
        taken = await sam.post("/pumps/assign", serial=SERIAL_A2, patient_id=day.cy)
        assert taken.status_code == 404
        assert "known to your clinic" in taken.text
        mine = await sam.post("/pumps/assign", serial=SERIAL_A, patient_id=day.ben)
        assert mine.status_code == 422  # Ben is not a patient of Sam's clinic
    rows = await day.sql(
        "SELECT serial, clinic_id, patient_id, refill_appointment_at FROM pumps "
        "WHERE serial = ANY($1) ORDER BY serial",
        [SERIAL_A, SERIAL_A2],
    )
    assert [(str(r["clinic_id"]), r["refill_appointment_at"]) for r in rows] == [
        (day.a, None),
        (day.a, None),
    ]
    assert not await day.sql(
        "SELECT 1 FROM events WHERE type = 'refill' AND source_kind = 'http_api'"
    )


def _patient_row(html: str, name: str) -> str:
    """The patient list's row of the patient named ``name``."""
    [found] = [r for r in html.split('<tr class="patient-row">')[1:] if f">{name}</a>" in r]
    return found.split("</tr>")[0]


async def test_the_patient_list_reads_the_read_model_and_only_the_clinics_pumps(
    day: Day,
) -> None:
    """Issue 20: each patient's pump, refill deadline and booked visit come from the forecast
    read model (a row moved by hand moves the page); a stale row's pump is forecast from its
    snapshot (the page agrees with the API's pump then); a pump another clinic holds never
    shows, even for its patient's id."""
    pool = await asyncpg.create_pool(
        day.api.database_url, min_size=1, max_size=2, init=prepare_connection
    )
    assert pool is not None
    try:
        serials = [r["serial"] for r in await pool.fetch("SELECT serial FROM pumps")]
        assert (await evaluate(pool, *serials)).failed == []
        await pool.execute(
            "UPDATE pump_forecasts SET deadline_at = '2031-05-06 12:00Z', "
            "deadline_reason = 'drug_age' WHERE serial = $1",
            SERIAL_A,
        )
        fresh = "SELECT evaluated_version = version FROM pump_forecasts WHERE serial = $1"
        assert await pool.fetchval(fresh, SERIAL_A)
        soon = (datetime.now(BERLIN) + timedelta(days=3)).replace(
            hour=9, minute=30, second=0, microsecond=0
        )
        async with day.signed_in(NURSE_A) as nora:
            booked = await nora.post(f"/pumps/{SERIAL_A}/visit", when=f"{soon:%Y-%m-%dT%H:%M}")
            assert booked.status_code == 303, booked.text
            listed = await nora.get("/patients")
            ada = _patient_row(listed.text, "Ada Soon")
            assert SERIAL_A in ada
            assert '2031-05-06 <span class="muted">drug age</span>' in ada  # the row's
            assert f"{soon:%Y-%m-%d} 09:30 CE" in ada  # the booked visit, in the clinic's zone
            assert "assign a pump" in _patient_row(listed.text, "Ben Later")
            assert SERIAL_B not in listed.text
            # The patient's margin makes the row stale: the page forecasts it as the API does.
            await pool.execute(
                "UPDATE patients SET low_alarm_margin_ml = 4.0 WHERE id = $1", uuid.UUID(day.ada)
            )
            assert not await pool.fetchval(fresh, SERIAL_A)
            state = await day.api.call("GET", f"/v1/pumps/{SERIAL_A}", ADMIN_TOKEN)
            deadline = datetime.fromisoformat(state.json()["forecast"]["refill_deadline_at"])
            ada = _patient_row((await nora.get("/patients")).text, "Ada Soon")
            assert "2031-05-06" not in ada
            assert f"{deadline.astimezone(BERLIN):%Y-%m-%d} <span" in ada
            assert f"{soon:%Y-%m-%d} 09:30 CE" in ada
        async with day.signed_in(NURSE_B) as sam:
            cy = _patient_row((await sam.get("/patients")).text, "Cy Other")
            assert SERIAL_B in cy
            assert SERIAL_A not in (await sam.get("/patients")).text
        # Clinic A's principal, asking for clinic B's patient: nothing (the clinic's filter).
        conn = await day.api.conn()
        try:
            a = Principal(key_id=None, role="clinician", clinic_id=uuid.UUID(day.a))
            assert await pumps_by_patient(conn, a, [uuid.UUID(day.cy)]) == {}
            admin = Principal(key_id=None, role="admin", clinic_id=None)
            found = await pumps_by_patient(conn, admin, [uuid.UUID(day.cy), uuid.UUID(day.ada)])
            assert {p.serial for p in found.values()} == {SERIAL_A, SERIAL_B}
        finally:
            await conn.close()
    finally:
        await pool.close()
