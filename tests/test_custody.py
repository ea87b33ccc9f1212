"""Pump custody and alert truth, as journeys across the parts (HTTP contract 1.1).

A pump reports before anyone owns it and the alert engine opens its alerts; a clinic claims it
with the code its programmer shows (or an administrator provisions it) and sees, acknowledges
and is notified of those alerts at once; the pump moves and its alerts move with it; each clinic
reads the pump's history only for the periods it held the pump. Real parts throughout: the API
in-process over its ASGI stack, the alert engine's own evaluation, the notification worker
delivering to a real HTTP receiver, all on a real PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from standardwebhooks import Webhook

from services.api.fhir.resources import MEASURES, observation_id
from tests import alert_fixtures as fx
from tests.api_support import ADMIN_TOKEN, Api, running_api
from tests.notify_support import (
    add_webhook,
    evaluate,
    pool_for,
    receiver,
    running,
    settings,
)

SERIAL = "NGPCUST001"
CODE = "K7Q2M9"


@dataclass
class Clinics:
    api: Api
    pool: asyncpg.Pool
    a: str
    b: str
    patient_a: str
    patient_a2: str
    patient_b: str
    nurse_a: str
    nurse_b: str


@pytest.fixture
async def clinics(database_url: str) -> AsyncIterator[Clinics]:
    async with (
        running_api(database_url, api_auth_failures_per_minute=10_000) as api,
        pool_for(database_url) as pool,
    ):
        async with pool.acquire() as conn:
            a = await fx.clinic(conn, name="Spinal unit A")
            b = await fx.clinic(conn, name="Pain clinic B")
            patient_a = await fx.patient(conn, a, mrn="A-1")
            patient_a2 = await fx.patient(conn, a, mrn="A-2")
            patient_b = await fx.patient(conn, b, mrn="B-1")
        yield Clinics(
            api,
            pool,
            a,
            b,
            patient_a,
            patient_a2,
            patient_b,
            await api.key("clinician", a),
            await api.key("clinician", b),
        )


async def _reports_empty(pool: asyncpg.Pool, at: datetime) -> None:
    """The pump reports an empty reservoir (before anyone holds it)."""
    async with pool.acquire() as conn:
        await fx.pump(conn, SERIAL)
        await fx.reading(conn, SERIAL, at, volume_ml=0.0, alarms=("empty_reservoir",))


async def _alerts(c: Clinics, key: str, **params: Any) -> list[dict[str, Any]]:
    answer = await c.api.call("GET", "/v1/alerts", key, params={"serial": SERIAL, **params})
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


async def _claim_code(pool: asyncpg.Pool, code: str = CODE, *, minutes: float = 30) -> None:
    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        await fx.claim_event(
            conn, SERIAL, code, recorded_at=now, expires_at=now + timedelta(minutes=minutes)
        )


async def test_a_pump_that_alerted_unheld_hands_its_alerts_to_the_clinic_that_claims_it(
    clinics: Clinics, database_url: str
) -> None:
    c = clinics
    await _reports_empty(c.pool, datetime.now(UTC) - timedelta(minutes=10))
    await evaluate(c.pool, SERIAL)
    opened = await _alerts(c, ADMIN_TOKEN)
    assert opened, "the engine opened no alert for an empty reservoir"
    assert all(a["clinic_id"] is None for a in opened)  # nobody's yet: admins and fleet see it
    assert await _alerts(c, c.nurse_a) == []
    assert (await c.api.call("GET", f"/v1/pumps/{SERIAL}", c.nurse_a)).status_code == 404
    refused = await c.api.call(
        "POST", f"/v1/alerts/{opened[0]['id']}/acknowledge", c.nurse_a, json={}
    )
    assert refused.status_code == 404

    secret = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"
    with receiver() as hook:
        await add_webhook(c.pool, c.a, hook.url(), secret, events=("alert.assigned",))
        await _claim_code(c.pool)
        claimed = await c.api.call(
            "PUT",
            f"/v1/pumps/{SERIAL}",
            c.nurse_a,
            json={"claim_code": CODE.lower(), "patient_id": c.patient_a},
        )
        assert claimed.status_code == 200, claimed.text
        assert claimed.json()["clinic_id"] == c.a
        assert claimed.json()["patient_id"] == c.patient_a

        # At once: the clinic sees the alerts as its own and its patient's, and can act.
        mine = await _alerts(c, c.nurse_a)
        assert {a["id"] for a in mine} == {a["id"] for a in opened}
        assert all(a["clinic_id"] == c.a and a["patient_id"] == c.patient_a for a in mine)
        acknowledged = await c.api.call(
            "POST", f"/v1/alerts/{mine[0]['id']}/acknowledge", c.nurse_a, json={"note": "seen"}
        )
        assert acknowledged.status_code == 200, acknowledged.text
        detail = await c.api.call("GET", f"/v1/alerts/{mine[0]['id']}", c.nurse_a)
        actions = [h["action"] for h in detail.json()["history"]]
        assert actions[:1] == ["opened"]
        assert "custody" in actions
        assert actions[-1] == "acknowledged"
        dashboard = await c.api.call("GET", f"/v1/patients/{c.patient_a}/dashboard", c.nurse_a)
        assert {a["id"] for a in dashboard.json()["open_alerts"]} == {a["id"] for a in opened}

        # The clinic's webhook hears of each alert it now holds.
        async with running(c.pool, settings(database_url)) as worker:
            await worker.until(lambda: hook.count() >= len(opened))
        bodies = [Webhook(secret).verify(r.body, r.headers) for r in hook.received]
        assert {b["type"] for b in bodies} == {"alert.assigned"}
        assert {b["data"]["id"] for b in bodies} == {a["id"] for a in opened}
        assert all(b["data"]["clinic_id"] == c.a for b in bodies)
        assert all(b["data"]["patient_id"] == c.patient_a for b in bodies)

    # The code was used: nobody can use it again, not even the clinic that did.
    again = await c.api.call("PUT", f"/v1/pumps/{SERIAL}", c.nurse_b, json={"claim_code": CODE})
    assert again.status_code == 404  # clinic A's pump, exactly as one that does not exist


async def test_claims_need_the_right_unexpired_unused_code_and_wrong_ones_are_limited(
    clinics: Clinics,
) -> None:
    c = clinics
    await _reports_empty(c.pool, datetime.now(UTC) - timedelta(minutes=5))
    put = f"/v1/pumps/{SERIAL}"
    none = await c.api.call("PUT", put, c.nurse_a, json={"patient_id": c.patient_a})
    assert none.status_code == 403
    assert "claim code" in none.json()["detail"]
    await _claim_code(c.pool, "EXPIRED1", minutes=-1)
    expired = await c.api.call("PUT", put, c.nurse_a, json={"claim_code": "EXPIRED1"})
    assert expired.status_code == 403
    wrong = await c.api.call("PUT", put, c.nurse_a, json={"claim_code": "WRONG123"})
    assert wrong.status_code == 403
    malformed = await c.api.call("PUT", put, c.nurse_a, json={"claim_code": "AB-12"})
    assert malformed.status_code == 422
    async with c.pool.acquire() as conn:
        assert await conn.fetchval("SELECT clinic_id FROM pumps WHERE serial = $1", SERIAL) is None
        assert await conn.fetchval("SELECT count(*) FROM pump_assignments") == 0
        # The two wrong codes were counted, though each refusal rolled back everything else.
        assert await conn.fetchval("SELECT count(*) FROM claim_failures") == 2
    for _ in range(3):  # the limit is 5 per 15 minutes
        await c.api.call("PUT", put, c.nurse_b, json={"claim_code": "WRONG456"})
    await _claim_code(c.pool)
    locked = await c.api.call("PUT", put, c.nurse_a, json={"claim_code": CODE})
    assert locked.status_code == 429, locked.text  # even the right code waits now
    assert "Retry-After" in locked.headers
    async with c.pool.acquire() as conn:
        await conn.execute("DELETE FROM claim_failures")  # the window passes
    claimed = await c.api.call("PUT", put, c.nurse_a, json={"claim_code": CODE})
    assert claimed.status_code == 200, claimed.text
    assert claimed.json()["clinic_id"] == c.a
    assert claimed.json()["patient_id"] is None  # claimed; a patient can be given later
    assigned = await c.api.call("PUT", put, c.nurse_a, json={"patient_id": c.patient_a})
    assert assigned.status_code == 200
    assert assigned.json()["patient_id"] == c.patient_a


async def test_a_never_seen_serial_is_provisioned_only_by_an_administrator(
    clinics: Clinics,
) -> None:
    c = clinics
    put = "/v1/pumps/NGPNEVER01"
    nurse = await c.api.call("PUT", put, c.nurse_a, json={"patient_id": c.patient_a})
    assert nurse.status_code == 403
    fleet = await c.api.key("fleet")
    provisioned = await c.api.call("PUT", put, fleet, json={"clinic_id": c.b})
    assert provisioned.status_code == 201, provisioned.text
    assert provisioned.json()["clinic_id"] == c.b
    wrong_patient = await c.api.call(
        "PUT", put, ADMIN_TOKEN, json={"clinic_id": c.b, "patient_id": c.patient_a}
    )
    assert wrong_patient.status_code == 422
    assert (
        await c.api.call("PUT", put, c.nurse_a, json={"patient_id": c.patient_a})
    ).status_code == 404
    mine = await c.api.call("PUT", put, c.nurse_b, json={"patient_id": c.patient_b})
    assert mine.status_code == 200, mine.text
    moved = await c.api.call("PUT", put, c.nurse_b, json={"patient_id": str(uuid.uuid4())})
    assert moved.status_code == 422  # no such patient of clinic B


async def test_a_moved_pump_takes_its_alerts_and_each_clinic_reads_only_its_own_periods(
    clinics: Clinics,
) -> None:
    c = clinics
    now = datetime.now(UTC)
    async with c.pool.acquire() as conn:
        await fx.pump(conn, SERIAL, patient_id=c.patient_a)  # clinic A's from the start
        for hours in (30, 20, 10):
            await fx.reading(conn, SERIAL, now - timedelta(hours=hours), volume_ml=10 + hours)
        await fx.reading(
            conn, SERIAL, now - timedelta(hours=2), volume_ml=9.0, alarms=("motor_stall",)
        )
    await evaluate(c.pool, SERIAL)
    [stalled] = [a for a in await _alerts(c, c.nurse_a) if a["rule"] == "flow_stopped"]
    ack = await c.api.call("POST", f"/v1/alerts/{stalled['id']}/acknowledge", c.nurse_a, json={})
    assert ack.status_code == 200

    # Within clinic A, to another patient: the alert follows the patient change.
    moved = await c.api.call(
        "PUT", f"/v1/pumps/{SERIAL}", c.nurse_a, json={"patient_id": c.patient_a2}
    )
    assert moved.status_code == 200
    [same] = [a for a in await _alerts(c, c.nurse_a) if a["id"] == stalled["id"]]
    assert same["patient_id"] == c.patient_a2
    assert same["status"] == "acknowledged"  # the same clinic saw it already

    # To clinic B (an administrator moves it): B holds the alert, A loses it.
    to_b = await c.api.call(
        "PUT", f"/v1/pumps/{SERIAL}", ADMIN_TOKEN, json={"patient_id": c.patient_b}
    )
    assert to_b.status_code == 200, to_b.text
    assert to_b.json()["clinic_id"] == c.b
    theirs = await _alerts(c, c.nurse_b)
    assert stalled["id"] in {a["id"] for a in theirs}
    [handed] = [a for a in theirs if a["id"] == stalled["id"]]
    assert handed["clinic_id"] == c.b
    assert handed["status"] == "open"  # clinic B has not seen it: it must be acknowledged again
    assert await _alerts(c, c.nurse_a) == []
    old = await c.api.call("GET", f"/v1/alerts/{stalled['id']}", c.nurse_a)
    assert old.status_code == 404
    assert (
        await c.api.call("POST", f"/v1/alerts/{stalled['id']}/acknowledge", c.nurse_a, json={})
    ).status_code == 404
    assert (await c.api.call("GET", f"/v1/pumps/{SERIAL}", c.nurse_a)).status_code == 404
    async with c.pool.acquire() as conn:
        events = await conn.fetch(
            "SELECT event, clinic_id FROM outbox WHERE alert_id = $1 ORDER BY id",
            uuid.UUID(stalled["id"]),
        )
    assigned = [(e["event"], str(e["clinic_id"])) for e in events if e["event"] == "alert.assigned"]
    assert assigned == [("alert.assigned", c.a), ("alert.assigned", c.b)]

    # Readings after the move are B's; those before were A's, and stay A's alone.
    async with c.pool.acquire() as conn:
        await fx.reading(conn, SERIAL, datetime.now(UTC) + timedelta(seconds=1), volume_ml=8.0)

    async def volumes(key: str) -> list[float]:
        answer = await c.api.call("GET", f"/v1/pumps/{SERIAL}/telemetry", key)
        assert answer.status_code == 200, answer.text
        return [r["volume_ml"] for r in answer.json()["items"]]

    assert await volumes(c.nurse_b) == [8.0]
    assert await volumes(c.nurse_a) == [9.0, 20.0, 30.0, 40.0]
    assert await volumes(ADMIN_TOKEN) == [8.0, 9.0, 20.0, 30.0, 40.0]
    async with c.pool.acquire() as conn:
        await fx.rollup(conn)
        moved_at = await conn.fetchval(
            "SELECT since FROM pump_assignments WHERE serial = $1 AND until IS NULL", SERIAL
        )
    dashboard_b = await c.api.call("GET", f"/v1/patients/{c.patient_b}/dashboard", c.nurse_b)
    assert dashboard_b.status_code == 200
    shown = [datetime.fromisoformat(p["at"]) for p in dashboard_b.json()["series"]["actual"]]
    assert all(hour >= moved_at for hour in shown), (shown, moved_at)
    admin_view = await c.api.call(
        "GET", f"/v1/pumps/{SERIAL}/telemetry", ADMIN_TOKEN, params={"bucket": "1h"}
    )
    assert len(admin_view.json()["items"]) >= 4  # the hours before the move exist
    async with c.pool.acquire() as conn:
        periods = await conn.fetch(
            "SELECT clinic_id, patient_id, how, until IS NULL AS current FROM pump_assignments "
            "WHERE serial = $1 ORDER BY id",
            SERIAL,
        )
    assert [(str(p["clinic_id"]), str(p["patient_id"]), p["current"]) for p in periods] == [
        (c.a, c.patient_a, False),
        (c.a, c.patient_a2, False),
        (c.b, c.patient_b, True),
    ]
    assert [p["how"] for p in periods] == ["assigned", "moved", "provisioned"]


# -- every route of the OpenAPI table, for a moved pump -------------------------------------------

_A_VOLUMES = (11.111, 12.222, 13.333)
"""Readings of the pump while clinic A held it (distinctive numbers to look for)."""
_B_VOLUMES = (21.111, 22.222)
"""…and after it moved to clinic B."""


def _about_a_pump_or_patient(method: str, template: str) -> bool:
    return method == "GET" and (
        any(p in template for p in ("{serial}", "{patient_id}", "{device}"))
        or template.startswith("/fhir/Observation")
        or template == "/v1/alerts"
    )


def _shown(text: str, volumes: tuple[float, ...], msg_ids: list[str]) -> list[str]:
    return [str(v) for v in volumes if str(v) in text] + [m for m in msg_ids if m in text]


async def test_no_route_shows_a_clinic_another_clinics_period_of_a_moved_pump(
    clinics: Clinics,
) -> None:
    """Generated from the route table: every GET about a pump or patient, called by each
    clinic's key with each clinic's ids, never shows the readings of a period that was not the
    caller's."""
    from tests.test_api_tenancy import ROUTES, _path, _query

    c = clinics
    start = datetime.now(UTC) - timedelta(hours=6)
    async with c.pool.acquire() as conn:
        await fx.pump(conn, SERIAL, patient_id=c.patient_a)
        for n, volume in enumerate(_A_VOLUMES):
            await fx.reading(conn, SERIAL, start + timedelta(minutes=10 * n), volume_ml=volume)
    moved = await c.api.call(
        "PUT", f"/v1/pumps/{SERIAL}", ADMIN_TOKEN, json={"patient_id": c.patient_b}
    )
    assert moved.status_code == 200, moved.text
    async with c.pool.acquire() as conn:
        moved_at = await conn.fetchval(
            "SELECT since FROM pump_assignments WHERE serial = $1 AND until IS NULL", SERIAL
        )
        for n, volume in enumerate(_B_VOLUMES):  # after the move, before anyone reads
            await fx.reading(
                conn, SERIAL, moved_at + timedelta(milliseconds=n + 1), volume_ml=volume
            )
        await fx.rollup(conn)
        ids = await conn.fetch(
            "SELECT msg_id::text AS id, volume_ml FROM readings WHERE serial = $1", SERIAL
        )
    a_ids = [r["id"] for r in ids if r["volume_ml"] in _A_VOLUMES]
    async with c.pool.acquire() as conn:
        a_reading = await conn.fetchrow(
            "SELECT msg_id, recorded_at FROM readings WHERE serial = $1 AND volume_ml = $2",
            SERIAL,
            _A_VOLUMES[0],
        )
    assert a_reading is not None
    a_observation = observation_id(
        SERIAL, a_reading["recorded_at"], a_reading["msg_id"], MEASURES[0]
    )
    b_ids = [r["id"] for r in ids if r["volume_ml"] in _B_VOLUMES]
    assert len(a_ids) == len(_A_VOLUMES)
    assert len(b_ids) == len(_B_VOLUMES)
    integrator_a = await c.api.key("integrator", c.a)
    callers = {
        "clinic A": (c.nurse_a, c.patient_a),
        "clinic A integrator": (integrator_a, c.patient_a),
    }
    callers["clinic B"] = (c.nurse_b, c.patient_b)
    checked = 0
    leaks = []
    for method, template in ROUTES:
        if not _about_a_pump_or_patient(method, template):
            continue
        for who, (key, patient) in callers.items():
            route_ids = {
                "serial": SERIAL,
                "patient": patient,
                "alert": str(uuid.uuid4()),
                "clinic": c.a if "A" in who else c.b,
                "webhook": str(uuid.uuid4()),
                "key": str(uuid.uuid4()),
                "observation": a_observation,  # of A's period: B must not read it
            }
            params = _query(method, template, route_ids)
            if template.startswith("/fhir/Observation"):
                params["device"] = f"Device/{SERIAL}"
            answer = await c.api.call(method, _path(template, route_ids), key, params=params)
            assert answer.status_code < 500, (template, answer.text)
            foreign = (_B_VOLUMES, b_ids) if "A" in who else (_A_VOLUMES, a_ids)
            shown = _shown(answer.text, *foreign)
            if shown:
                leaks.append(f"{who} GET {template} -> {answer.status_code}: shows {shown}")
            checked += 1
    assert checked >= 8
    assert not leaks, "\n".join(leaks)
    # And each sees its own period where the route shows readings.
    own_a = await c.api.call("GET", f"/v1/pumps/{SERIAL}/telemetry", c.nurse_a)
    own_b = await c.api.call("GET", f"/v1/pumps/{SERIAL}/telemetry", c.nurse_b)
    assert _shown(own_a.text, _A_VOLUMES, a_ids)
    assert _shown(own_b.text, _B_VOLUMES, b_ids)
