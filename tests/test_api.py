"""The HTTP API on a real database: the contract's routes, auth, problems, audit, metrics."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.api import keys
from tests.api_support import ADMIN_TOKEN, Api, World, running_api, world


def problem(response: object) -> dict[str, object]:
    import httpx

    assert isinstance(response, httpx.Response)
    assert response.headers["content-type"] == "application/problem+json", response.text
    body = response.json()
    assert isinstance(body, dict)
    assert {"type", "title", "status", "detail"} <= set(body)
    assert body["status"] == response.status_code
    return body


async def count(api: Api, query: str, *args: object) -> int:
    conn = await api.conn()
    try:
        return int(await conn.fetchval(query, *args))
    finally:
        await conn.close()


# --- setting up a clinic -------------------------------------------------------------------------


async def test_an_admin_sets_up_a_clinic_with_keys_patients_and_pumps(api: Api) -> None:
    made = await api.call(
        "POST",
        "/v1/clinics",
        ADMIN_TOKEN,
        json={"name": "Spinal Unit", "timezone": "Europe/Berlin"},
    )
    assert made.status_code == 201, made.text
    clinic_id = made.json()["id"]
    created = await api.call(
        "POST", f"/v1/clinics/{clinic_id}/keys", ADMIN_TOKEN, json={"role": "clinician"}
    )
    assert created.status_code == 201
    key = created.json()["key"]
    assert key.startswith("pw_")
    conn = await api.conn()
    try:  # only the hash is stored
        stored = await conn.fetchval(
            "SELECT key_hash FROM api_keys WHERE id = $1", uuid.UUID(created.json()["id"])
        )
        assert stored == keys.hash_key(key)
        assert key.encode() not in stored
    finally:
        await conn.close()

    patient = await api.call(
        "POST",
        "/v1/patients",
        key,
        json={"mrn": "MRN-1", "display_name": "A. Example", "withdrawal_risk": "high"},
    )
    assert patient.status_code == 201, patient.text
    assert patient.json()["clinic_id"] == clinic_id  # implied by the clinic key
    again = await api.call(
        "POST", "/v1/patients", key, json={"mrn": "MRN-1", "display_name": "Someone else"}
    )
    assert again.status_code == 409
    problem(again)

    # Contract 1.1: a clinic cannot pre-register a serial no pump has reported with; an
    # administrator provisions it to the clinic, which then assigns it.
    unknown = await api.call(
        "PUT",
        "/v1/pumps/NGP000777A",
        key,
        json={"patient_id": patient.json()["id"], "implanted_on": "2024-03-01"},
    )
    assert unknown.status_code == 403, unknown.text
    assert "claim code" in str(problem(unknown)["detail"])
    assert (await api.call("GET", "/v1/pumps/NGP000777A", ADMIN_TOKEN)).status_code == 404
    provisioned = await api.call(
        "PUT", "/v1/pumps/NGP000777A", ADMIN_TOKEN, json={"clinic_id": clinic_id}
    )
    assert provisioned.status_code == 201, provisioned.text
    assert provisioned.json()["clinic_id"] == clinic_id
    assert provisioned.json()["patient_id"] is None
    pump = await api.call(
        "PUT",
        "/v1/pumps/NGP000777A",
        key,
        json={"patient_id": patient.json()["id"], "implanted_on": "2024-03-01"},
    )
    assert pump.status_code == 200, pump.text
    assert pump.json()["patient_id"] == patient.json()["id"]
    moved = await api.call(
        "PUT", "/v1/pumps/NGP000777A", key, json={"patient_id": patient.json()["id"]}
    )
    assert moved.status_code == 200
    assert moved.json()["implanted_on"] == "2024-03-01"  # kept

    booked = await api.call(
        "PUT",
        "/v1/pumps/NGP000777A/refill-appointment",
        key,
        json={"scheduled_for": "2026-12-02T09:30:00+01:00"},
    )
    assert booked.status_code == 200
    assert booked.json()["refill_appointment_at"] == "2026-12-02T08:30:00Z"
    cleared = await api.call(
        "PUT", "/v1/pumps/NGP000777A/refill-appointment", key, json={"scheduled_for": None}
    )
    assert cleared.json()["refill_appointment_at"] is None


async def test_clinic_alert_settings_are_validated_by_the_engine_s_own_model(
    api: Api, w: World
) -> None:
    path = f"/v1/clinics/{w.a.id}/alert-settings"
    put = await api.call(
        "PUT", path, w.a.clinician, json={"refill_due_low_days": 28, "disabled_rules": ["drug_age"]}
    )
    assert put.status_code == 200, put.text
    got = await api.call("GET", path, w.a.integrator)
    assert got.json()["refill_due_low_days"] == 28
    assert got.json()["disabled_rules"] == ["drug_age"]
    bad = await api.call("PUT", path, w.a.clinician, json={"refill_due_low_days": -1})
    assert bad.status_code == 422
    assert problem(bad)["errors"] == [
        {"field": "body.refill_due_low_days", "message": "must be greater than 0"}
    ]
    unknown_rule = await api.call("PUT", path, w.a.clinician, json={"disabled_rules": ["nope"]})
    assert unknown_rule.status_code == 422
    other = await api.call("PUT", f"/v1/clinics/{w.b.id}/alert-settings", w.a.clinician, json={})
    assert other.status_code == 404
    assert (await api.call("PUT", path, w.a.integrator, json={})).status_code == 403


# --- reading -------------------------------------------------------------------------------------


async def test_pump_state_carries_the_engine_s_forecast(api: Api, w: World) -> None:
    found = await api.call("GET", f"/v1/pumps/{w.a.serial}", w.a.clinician)
    assert found.status_code == 200
    body = found.json()
    forecast = body["forecast"]
    assert forecast["low_alarm_ml"] == 2.0
    assert forecast["rate_ml_per_day"] == 0.2
    # 17.6 mL at 0.2 mL/day reaches 2 mL in 78 days
    assert forecast["days_to_low_alarm"] == pytest.approx(78.0, abs=0.01)
    assert forecast["basis"] == "calculated"
    assert body["therapy"]["concentration_mcg_per_ml"] == 2000.0


async def test_pump_state_shows_only_gaps_backfill_gave_up_on(api: Api, w: World) -> None:
    path = f"/v1/pumps/{w.a.serial}"
    before = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
    conn = await api.conn()
    try:
        await conn.execute(
            "INSERT INTO sequence_gaps (serial, source_id, first_missing, last_missing, state, "
            "before_at, after_at) VALUES ($1, 'HUB-1', 10, 12, 'open', $2, $3)",
            w.a.serial,
            before,
            before + timedelta(hours=1),
        )
        assert (await api.call("GET", path, w.a.clinician)).json()["unrecovered_gaps"] is None
        await conn.execute(
            "INSERT INTO sequence_gaps (serial, source_id, first_missing, last_missing, state, "
            "before_at, after_at) VALUES ($1, 'HUB-1', 20, 24, 'unrecoverable', $2, $3)",
            w.a.serial,
            before + timedelta(hours=2),
            before + timedelta(hours=3),
        )
    finally:
        await conn.close()
    gaps = (await api.call("GET", path, w.a.clinician)).json()["unrecovered_gaps"]
    assert gaps == {
        "missing_messages": 5,
        "missing_from": "2026-11-20T10:00:00Z",
        "missing_until": "2026-11-20T11:00:00Z",
    }


async def test_telemetry_pages_newest_first_without_gaps_or_repeats(api: Api, w: World) -> None:
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": "3"} | ({"cursor": cursor} if cursor else {})
        page = await api.call(
            "GET", f"/v1/pumps/{w.a.serial}/telemetry", w.a.clinician, params=params
        )
        assert page.status_code == 200, page.text
        seen.extend(r["recorded_at"] for r in page.json()["items"])
        cursor = page.json()["next_cursor"]
        pages += 1
        if cursor is None:
            break
    assert len(seen) == 9 == len(set(seen))
    assert seen == sorted(seen, reverse=True)
    assert pages == 3
    window = await api.call(
        "GET",
        f"/v1/pumps/{w.a.serial}/telemetry",
        w.a.clinician,
        params={"since": seen[3], "until": seen[0]},
    )
    assert [r["recorded_at"] for r in window.json()["items"]] == seen[1:4]


async def test_bad_cursors_and_windows_are_4xx_problems(api: Api, w: World) -> None:
    base = f"/v1/pumps/{w.a.serial}/telemetry"
    for cursor in ("not-a-cursor", "W10", "WyJ4IiwgInkiXQ"):  # junk, [], ["x", "y"]
        bad = await api.call("GET", base, w.a.clinician, params={"cursor": cursor})
        assert bad.status_code == 400, (cursor, bad.text)
        problem(bad)
    backwards = await api.call(
        "GET",
        base,
        w.a.clinician,
        params={"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
    )
    assert backwards.status_code == 422
    assert problem(backwards)["errors"] == [
        {"field": "query.until", "message": "must be after since"}
    ]
    naive = await api.call("GET", base, w.a.clinician, params={"since": "2026-02-01T00:00:00"})
    assert naive.status_code == 422
    for limit in ("0", "501", "x"):
        assert (
            await api.call("GET", base, w.a.clinician, params={"limit": limit})
        ).status_code == 422


async def test_the_worklist_orders_pumps_by_their_effective_refill_deadline(
    api: Api, w: World
) -> None:
    now = datetime.now(UTC)
    conn = await api.conn()
    try:  # a pump of clinic A that runs low sooner, and one whose drug is nearly 180 days old
        from tests import alert_fixtures as fx

        patient = await fx.patient(conn, w.a.id)
        await fx.pump(conn, "NGPAAAA02", patient_id=patient)
        await fx.reading(conn, "NGPAAAA02", now - timedelta(hours=1), volume_ml=3.0)
        old_drug = await fx.patient(conn, w.a.id)
        await fx.pump(conn, "NGPAAAA03", patient_id=old_drug)
        await fx.refill_event(
            conn, "NGPAAAA03", now - timedelta(days=177), residual_ml=5.0, expected_residual_ml=5.0
        )
        await fx.reading(conn, "NGPAAAA03", now - timedelta(hours=1), volume_ml=30.0)
    finally:
        await conn.close()
    due = await api.call("GET", "/v1/refills/due", w.a.clinician, params={"within_days": 100})
    assert due.status_code == 200
    items = due.json()["items"]
    assert [i["serial"] for i in items] == ["NGPAAAA03", "NGPAAAA02", w.a.serial]
    drug, low = items[0], items[1]
    assert drug["refill_deadline_reason"] == "drug_age"
    assert drug["days_to_refill_deadline"] == pytest.approx(3.0, abs=0.01)
    assert drug["days_left"] > 100  # the reservoir itself would last
    assert low["refill_deadline_reason"] == "low_alarm"
    assert low["days_to_refill_deadline"] == low["days_left"]
    items = items[1:]
    assert items[0]["days_left"] == pytest.approx(5.0 - 1 / 24, abs=0.01)
    assert items[1]["last_refill_at"] is not None
    assert items[1]["open_alerts"][0]["rule"] == "refill_due"
    assert items[0]["patient"]["id"] == patient
    near = await api.call("GET", "/v1/refills/due", w.a.clinician, params={"within_days": 10})
    assert [i["serial"] for i in near.json()["items"]] == ["NGPAAAA03", "NGPAAAA02"]
    fleet = await api.call("GET", "/v1/refills/due", w.fleet, params={"within_days": 100})
    assert {i["serial"] for i in fleet.json()["items"]} >= {w.a.serial, w.b.serial, "NGPAAAA02"}
    assert all(i["patient"] is None for i in fleet.json()["items"])


async def test_the_dashboard_holds_what_the_page_shows(api: Api, w: World) -> None:
    found = await api.call("GET", f"/v1/patients/{w.a.patient_id}/dashboard", w.a.clinician)
    assert found.status_code == 200, found.text
    body = found.json()
    assert body["patient"]["id"] == w.a.patient_id
    assert body["pump"]["serial"] == w.a.serial
    assert body["latest_reading"]["volume_ml"] == pytest.approx(17.6)
    assert [a["id"] for a in body["open_alerts"]] == [w.a.alert_id]
    assert body["last_refill"]["added_ml"] == 20.0
    projected = body["series"]["projected"]
    assert len(projected) == 31
    assert projected[0]["volume_ml"] == pytest.approx(17.6)
    assert projected[10]["volume_ml"] == pytest.approx(15.6)


# --- changing ------------------------------------------------------------------------------------


async def test_a_refill_over_http_takes_the_event_path_and_returns_its_discrepancy(
    api: Api, w: World
) -> None:
    conn = await api.conn()
    await conn.execute("LISTEN pumpwatch_ingest")
    notified: list[str] = []
    await conn.add_listener("pumpwatch_ingest", lambda *args: notified.append(args[3]))
    try:
        msg_id = str(uuid.uuid4())
        body = {
            "msg_id": msg_id,
            "refill": {
                "residual_ml": 10.0,
                "added_ml": 20.0,
                "drug": "baclofen",
                "concentration_mcg_per_ml": 2000,
                "expected_residual_ml": 17.5,
            },
        }
        made = await api.call("POST", f"/v1/pumps/{w.a.serial}/refills", w.a.clinician, json=body)
        assert made.status_code == 201, made.text
        found = made.json()["discrepancy"]
        assert found["expected_from"] == "pump"
        assert found["delta_ml"] == 7.5
        assert found["classification"] == "over_delivery"
        again = await api.call("POST", f"/v1/pumps/{w.a.serial}/refills", w.a.clinician, json=body)
        assert again.status_code == 200  # the same msg_id: recorded once
        assert again.json()["discrepancy"] == found
        assert (
            await conn.fetchval("SELECT count(*) FROM events WHERE msg_id = $1", uuid.UUID(msg_id))
            == 1
        )
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM ingested_messages WHERE msg_id = $1", uuid.UUID(msg_id)
            )
            == 1
        )
        assert (
            await conn.fetchval("SELECT count(*) FROM outbox WHERE event = 'refill.recorded'") == 1
        )
        assert json.loads(notified[0]) == {"serials": [w.a.serial]}
        listed = await api.call("GET", f"/v1/pumps/{w.a.serial}/refills", w.a.integrator)
        assert listed.json()["items"][0]["discrepancy"] == found
    finally:
        await conn.close()


async def test_a_refill_and_its_event_commit_together_or_not_at_all(api: Api, w: World) -> None:
    """The database fails at the outbox write (as when it goes away mid-request): the refill
    must not stay recorded without its event, so that the client's retry records both."""
    conn = await api.conn()
    try:
        await conn.execute(
            """CREATE FUNCTION test_outbox_down() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN RAISE EXCEPTION 'the outbox is unavailable' USING ERRCODE = '57P01'; END $$;
               CREATE TRIGGER test_outbox_down BEFORE INSERT ON outbox
                   FOR EACH ROW EXECUTE FUNCTION test_outbox_down();"""
        )
        msg_id = str(uuid.uuid4())
        body = {
            "msg_id": msg_id,
            "refill": {
                "residual_ml": 10.0,
                "added_ml": 20.0,
                "drug": "baclofen",
                "concentration_mcg_per_ml": 2000,
            },
        }
        path = f"/v1/pumps/{w.a.serial}/refills"
        failed = await api.call("POST", path, w.a.clinician, json=body)
        assert failed.status_code == 503, failed.text
        assert (
            await conn.fetchval("SELECT count(*) FROM events WHERE msg_id = $1", uuid.UUID(msg_id))
            == 0
        )
        await conn.execute("DROP TRIGGER test_outbox_down ON outbox")
        retried = await api.call("POST", path, w.a.clinician, json=body)
        assert retried.status_code == 201, retried.text  # recorded now, not "already recorded"
        events = await conn.fetch("SELECT payload FROM outbox WHERE event = 'refill.recorded'")
        assert [e["payload"]["msg_id"] for e in events] == [msg_id]
    finally:
        await conn.close()


async def test_a_refill_breaking_the_contract_is_refused_with_the_contract_s_reason(
    api: Api, w: World
) -> None:
    path = f"/v1/pumps/{w.a.serial}/refills"
    refill = {
        "residual_ml": 1.0,
        "added_ml": 20.0,
        "drug": "baclofen",
        "concentration_mcg_per_ml": 2000,
    }
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    skewed = await api.call(
        "POST", path, w.a.clinician, json={"refill": refill, "recorded_at": future}
    )
    assert skewed.status_code == 422
    assert "clock_skew" in str(problem(skewed)["detail"])
    negative = await api.call(
        "POST", path, w.a.clinician, json={"refill": refill | {"added_ml": 0}}
    )
    assert negative.status_code == 422
    assert problem(negative)["errors"][0]["field"] == "body.refill.added_ml"  # type: ignore[index]
    mismatch = await api.call(
        "POST", path, w.a.clinician, json={"refill": refill, "serial": "NGPOTHER1"}
    )
    assert mismatch.status_code == 422
    assert (
        await api.call("POST", path, w.a.integrator, json={"refill": refill})
    ).status_code == 403
    assert await count(api, "SELECT count(*) FROM events WHERE source_kind = 'http_api'") == 0


async def test_acknowledge_is_idempotent_and_resolve_is_recorded(api: Api, w: World) -> None:
    path = f"/v1/alerts/{w.a.alert_id}"
    first = await api.call("POST", f"{path}/acknowledge", w.a.clinician, json={"note": "seen"})
    assert first.status_code == 200
    assert first.json()["status"] == "acknowledged"
    second = await api.call("POST", f"{path}/acknowledge", w.a.clinician)
    assert second.status_code == 200
    assert second.json()["acknowledged_at"] == first.json()["acknowledged_at"]
    resolved = await api.call("POST", f"{path}/resolve", w.a.clinician, json={"note": "refilled"})
    assert resolved.json()["status"] == "resolved"
    assert resolved.json()["resolution"] == "refilled"
    history = [h["action"] for h in resolved.json()["history"]]
    assert history == ["acknowledged", "resolved"]
    assert (await api.call("POST", f"{path}/resolve", w.a.clinician)).status_code == 409
    events = await count(
        api, "SELECT count(*) FROM outbox WHERE event IN ('alert.acknowledged', 'alert.resolved')"
    )
    assert events == 2
    assert (await api.call("POST", f"{path}/acknowledge", w.a.integrator)).status_code == 403
    other = await api.call("POST", f"/v1/alerts/{w.b.alert_id}/acknowledge", w.a.clinician)
    assert other.status_code == 404


async def test_webhooks_are_registered_listed_and_deleted_within_a_clinic(
    api: Api, w: World
) -> None:
    made = await api.call(
        "POST",
        "/v1/webhooks",
        w.a.integrator,
        json={"url": "https://ehr.example.org/hook", "events": ["alert.opened", "refill.recorded"]},
    )
    assert made.status_code == 201, made.text
    assert made.json()["secret"].startswith("whsec_")
    listed = await api.call("GET", "/v1/webhooks", w.a.clinician)
    assert [h["id"] for h in listed.json()["items"]] == [made.json()["id"]]
    assert "secret" not in listed.json()["items"][0]
    assert (await api.call("GET", "/v1/webhooks", w.b.clinician)).json()["items"] == []
    stolen = await api.call("DELETE", f"/v1/webhooks/{made.json()['id']}", w.b.clinician)
    assert stolen.status_code == 404
    gone = await api.call("DELETE", f"/v1/webhooks/{made.json()['id']}", w.a.integrator)
    assert gone.status_code == 204
    assert (await api.call("GET", "/v1/webhooks", w.a.clinician)).json()["items"] == []
    for url in (
        "http://ehr.example.org/hook",
        "https://10.0.0.5/hook",
        "https://169.254.169.254/x",
    ):
        refused = await api.call(
            "POST", "/v1/webhooks", w.a.integrator, json={"url": url, "events": ["alert.opened"]}
        )
        assert refused.status_code == 422, url
        assert problem(refused)["errors"][0]["field"] == "body.url"  # type: ignore[index]


# --- auth ----------------------------------------------------------------------------------------


async def test_keys_unknown_revoked_or_missing_are_401_and_failures_are_rate_limited(
    database_url: str,
) -> None:
    async with (
        running_api(database_url, api_auth_failures_per_minute=3) as api,
        running_api(database_url, api_auth_failures_per_minute=3) as other_process,
    ):
        w = await world(api)
        path = f"/v1/pumps/{w.a.serial}"
        assert (await api.call("GET", path, w.a.clinician)).status_code == 200
        # No credentials is not a failed authentication: however many, nothing is counted.
        for _ in range(5):
            answer = await api.call("GET", path, None)
            assert answer.status_code == 401
            assert answer.headers["www-authenticate"].startswith("Bearer")
            problem(answer)
        assert (await api.call("GET", path, w.fleet)).status_code == 200
        # Wrong ones are, in every API process alike (the count lives in the database).
        for key, caller in (("pw_nope", api), (w.revoked, other_process), ("pw_x", api)):
            answer = await caller.call("GET", path, key)
            assert answer.status_code == 401
            problem(answer)
        for caller in (api, other_process):
            limited = await caller.call("GET", path, "pw_another_guess")
            assert limited.status_code == 429
            assert int(limited.headers["retry-after"]) > 0
            problem(limited)
        # A right key is never refused, even one that never authenticated before, and from
        # the locked-out address; a request without a key still just gets 401.
        assert (await other_process.call("GET", path, w.a.integrator)).status_code == 200
        assert (await api.call("GET", path, w.a.clinician)).status_code == 200
        assert (await api.call("GET", path, None)).status_code == 401
        conn = await api.conn()
        try:
            await conn.execute(
                "UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1",
                keys.hash_key(w.a.clinician),
            )
        finally:
            await conn.close()
        # Revoked: wrong now, and the source is over its limit.
        assert (await api.call("GET", path, w.a.clinician)).status_code == 429


async def test_the_fleet_role_sees_pumps_but_no_patient(api: Api, w: World) -> None:
    pump = await api.call("GET", f"/v1/pumps/{w.a.serial}", w.fleet)
    assert pump.status_code == 200
    assert pump.json()["patient_id"] is None
    alerts = await api.call("GET", "/v1/alerts", w.fleet)
    assert {a["serial"] for a in alerts.json()["items"]} == {w.a.serial, w.b.serial}
    assert all(a["patient_id"] is None for a in alerts.json()["items"])
    assert (await api.call("GET", "/v1/patients", w.fleet)).status_code == 403
    for body in (pump.text, alerts.text):
        assert "MRN-" not in body
        assert "Test Patient" not in body


# --- problems, limits, audit, metrics ------------------------------------------------------------


async def test_oversized_and_malformed_bodies_are_problems_not_500(api: Api, w: World) -> None:
    big = await api.call(
        "POST",
        "/v1/patients",
        w.a.clinician,
        content=b"{" + b" " * 70_000 + b"}",
        headers={"content-type": "application/json"},
    )
    assert big.status_code == 413
    problem(big)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: sent chunked
        yield b"{"
        for _ in range(10):
            yield b" " * 10_000
        yield b"}"

    chunked = await api.call(
        "POST",
        "/v1/patients",
        w.a.clinician,
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert chunked.status_code == 413
    assert "over 65536 bytes" in str(problem(chunked)["detail"])
    broken = await api.call(
        "POST",
        "/v1/patients",
        w.a.clinician,
        content=b'{"mrn": ',
        headers={"content-type": "application/json"},
    )
    assert broken.status_code == 422
    problem(broken)
    extra = await api.call(
        "POST",
        "/v1/patients",
        w.a.clinician,
        json={"mrn": "x", "display_name": "y", "colour": "red"},
    )
    assert extra.status_code == 422
    assert problem(extra)["errors"][0]["field"] == "body.colour"  # type: ignore[index]
    wrong_id = await api.call("GET", "/v1/patients/not-a-uuid", w.a.clinician)
    assert wrong_id.status_code == 422
    method = await api.call("DELETE", "/v1/patients", w.a.clinician)
    assert method.status_code == 405
    problem(method)


async def test_every_read_of_patient_data_leaves_an_audit_row(api: Api, w: World) -> None:
    before = await count(api, "SELECT count(*) FROM audit_log")
    reads = [
        f"/v1/patients/{w.a.patient_id}",
        f"/v1/patients/{w.a.patient_id}/dashboard",
        f"/v1/pumps/{w.a.serial}",
        f"/v1/pumps/{w.a.serial}/telemetry",
        f"/v1/alerts/{w.a.alert_id}",
        "/v1/alerts",
        "/v1/refills/due",
        f"/v1/patients/{w.b.patient_id}",  # denied: audited too
    ]
    for path in reads:
        await api.call("GET", path, w.a.clinician)
    await api.call("GET", "/healthz", None)  # not patient data
    await api.call("GET", f"/v1/pumps/{w.a.serial}", None)  # unauthenticated: nothing read
    rows = await _audit_rows(api, before)
    assert len(rows) == len(reads)
    assert {r["outcome"] for r in rows[:-1]} == {"ok"}
    assert (rows[-1]["outcome"], rows[-1]["status"], rows[-1]["resource_id"]) == (
        "denied",
        404,
        w.b.patient_id,
    )
    assert {r["role"] for r in rows} == {"clinician"}
    assert rows[2]["resource_type"] == "pumps"
    assert rows[2]["resource_id"] == w.a.serial


async def _audit_rows(api: Api, after: int) -> list[asyncpg.Record]:
    conn = await api.conn()
    try:
        return list(await conn.fetch("SELECT * FROM audit_log ORDER BY id OFFSET $1", after))
    finally:
        await conn.close()


async def test_the_audit_log_is_append_only(api: Api, w: World) -> None:
    await api.call("GET", f"/v1/pumps/{w.a.serial}", w.a.clinician)
    conn = await api.conn()
    try:
        for statement in (
            "UPDATE audit_log SET outcome = 'x'",
            "DELETE FROM audit_log",
            "TRUNCATE audit_log",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(statement)
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == 1
    finally:
        await conn.close()


async def test_metrics_count_requests_per_route_template(api: Api, w: World) -> None:
    for serial in (w.a.serial, w.b.serial):
        await api.call("GET", f"/v1/pumps/{serial}", w.admin)
    text = (await api.call("GET", "/metrics", None)).text
    line = 'pumpwatch_api_requests_total{method="GET",route="/v1/pumps/{serial}",status="200"} 2.0'
    assert line in text
    assert (
        'pumpwatch_api_request_seconds_count{method="GET",route="/v1/pumps/{serial}"} 2.0' in text
    )
    assert w.a.serial not in text  # templates, not paths


async def test_metrics_can_require_a_key(database_url: str) -> None:
    async with running_api(database_url, api_metrics_public=False) as api:
        assert (await api.call("GET", "/metrics", None)).status_code == 401
        assert (await api.call("GET", "/metrics", ADMIN_TOKEN)).status_code == 200


async def test_ready_reports_pending_migrations(api: Api) -> None:
    assert (await api.call("GET", "/readyz", None)).json() == {"status": "ok"}
    conn = await api.conn()
    try:
        await conn.execute(
            "DELETE FROM schema_migrations "
            "WHERE version = (SELECT max(version) FROM schema_migrations)"
        )
    finally:
        await conn.close()
    answer = await api.call("GET", "/readyz", None)
    assert answer.status_code == 503
    assert "migrations pending" in answer.json()["detail"]


async def test_the_mqtt_contract_schema_is_served(api: Api) -> None:
    from services.domain.contract import schema_document

    answer = await api.call("GET", "/v1/schemas/mqtt-v1.json", None)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/schema+json"
    assert answer.json() == schema_document()


async def test_notification_routing_is_read_and_set_per_clinic(api: Api, w: World) -> None:
    path = f"/v1/clinics/{w.a.id}/notifications"
    defaults = await api.call("GET", path, w.a.integrator)
    assert defaults.status_code == 200
    assert defaults.json()["escalation"]["after_minutes"] == 15
    routing = {"email": {"high": ["oncall@clinic.example"]}, "escalation": {"after_minutes": 10}}
    put = await api.call("PUT", path, w.a.clinician, json=routing)
    assert put.status_code == 200, put.text
    assert put.json()["email"]["high"] == ["oncall@clinic.example"]
    conn = await api.conn()
    try:  # stored as the worker reads it
        from services.domain.notifications import NotificationSettings

        stored = await conn.fetchval(
            "SELECT notification_settings FROM clinics WHERE id = $1", uuid.UUID(w.a.id)
        )
        assert NotificationSettings.stored(stored).escalation.after_minutes == 10
    finally:
        await conn.close()
    bad = await api.call("PUT", path, w.a.clinician, json={"email": {"high": ["not-an-address"]}})
    assert bad.status_code == 422
    field = problem(bad)["errors"][0]["field"]  # type: ignore[index]
    assert str(field).startswith("body.email.high")
    assert (await api.call("PUT", path, w.a.integrator, json={})).status_code == 403
    assert (
        await api.call("GET", f"/v1/clinics/{w.b.id}/notifications", w.a.clinician)
    ).status_code == 404


async def test_a_webhook_secret_rotates_with_an_overlap(api: Api, w: World) -> None:
    made = await api.call(
        "POST",
        "/v1/webhooks",
        w.a.integrator,
        json={"url": "https://ehr.example.org/hook", "events": ["alert.unacknowledged"]},
    )
    assert made.status_code == 201, made.text
    hook = made.json()["id"]
    rotated = await api.call(
        "POST", f"/v1/webhooks/{hook}/rotate-secret", w.a.clinician, json={"overlap_hours": 2}
    )
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["secret"] != made.json()["secret"]
    conn = await api.conn()
    try:
        row = await conn.fetchrow(
            "SELECT secret, previous_secret, previous_secret_expires_at - now() AS left "
            "FROM webhooks WHERE id = $1",
            uuid.UUID(hook),
        )
    finally:
        await conn.close()
    assert row is not None
    assert (row["secret"], row["previous_secret"]) == (
        rotated.json()["secret"],
        made.json()["secret"],
    )
    assert timedelta(hours=1, minutes=59) < row["left"] <= timedelta(hours=2)
    other = await api.call("POST", f"/v1/webhooks/{hook}/rotate-secret", w.b.clinician)
    assert other.status_code == 404


def test_webhook_events_are_the_notifier_s() -> None:
    from typing import get_args

    from services.api.models import WebhookEvent
    from services.domain.notifications import WEBHOOK_EVENTS

    assert set(get_args(WebhookEvent)) == WEBHOOK_EVENTS
