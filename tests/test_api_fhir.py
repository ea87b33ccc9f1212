"""The FHIR R4 read endpoints on a real database, every body validated with the ``fhir.resources``
R4B models: Device, Observation search (values and UCUM units, filters, pages), Flag search and
read, tenancy and de-identification, OperationOutcome errors, the audit log, the OpenAPI text."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.flag import Flag
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient
from hypothesis import given
from hypothesis import strategies as st

from services.api import keys
from services.api.app import create_app
from services.api.common import encode_cursor
from services.api.fhir import search as fhir
from services.api.problems import Problem
from services.api.settings import ApiSettings
from services.storage.database import prepare_connection
from tests import alert_fixtures as fx

FHIR_JSON = "application/fhir+json"
SYSTEM = "https://pumpwatch.dev/fhir/CodeSystem/pump-observation"
UCUM = "http://unitsofmeasure.org"
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
MODEL = "SynchroMed II 8637-40"
MDC = "urn:iso:std:iso:11073:10101"
MDC_CODES = {
    "programmed-rate": [(MDC, "157784", "MDC_FLOW_FLUID_PUMP")],
    "programmed-dose": [(MDC, "157924", "MDC_RATE_DOSE")],
    "battery-remaining": [(MDC, "67996", "MDC_ATTR_VAL_BATT_CHARGE")],
}
UNITS = {
    "reservoir-volume": "mL",
    "programmed-rate": "mL/d",
    "programmed-dose": "ug/d",
    "battery-remaining": "%",
}


@dataclass
class Reading:
    at: datetime
    volume_ml: float
    rate_ml_per_day: float
    daily_dose_mcg: float | None
    battery_pct: float | None

    def values(self) -> dict[str, float]:
        found = {
            "reservoir-volume": self.volume_ml,
            "programmed-rate": self.rate_ml_per_day,
            "programmed-dose": self.daily_dose_mcg,
            "battery-remaining": self.battery_pct,
        }
        return {code: value for code, value in found.items() if value is not None}


# Newest first, as the API answers. One reading has no battery level, one no dose.
READINGS = [
    Reading(T0 - timedelta(hours=i), 20.0 - i * 0.25, 0.2 + i * 0.01, None, 90.0 - i)
    for i in range(5)
]
READINGS[2].battery_pct = None
for _reading in READINGS:
    _reading.daily_dose_mcg = round(_reading.rate_ml_per_day * 2000.0, 6)
READINGS[3].daily_dose_mcg = None
OBSERVATIONS = sum(len(r.values()) for r in READINGS)  # 18


@dataclass
class World:
    client: httpx.AsyncClient
    database_url: str
    clinic_a: str
    patient_a: str
    serial_a: str
    clinic_b: str
    patient_b: str
    serial_b: str
    unassigned: str
    open_alert: str
    acknowledged_alert: str
    resolved_alert: str
    alert_b: str
    unassigned_alert: str
    clinician: str
    integrator: str
    clinician_b: str
    admin: str
    fleet: str

    async def get(self, path: str, key: str | None, **params: Any) -> httpx.Response:
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        return await self.client.get(path, params=params or None, headers=headers)


async def _alert(
    conn: asyncpg.Connection,
    serial: str,
    *,
    rule: str,
    priority: str,
    status: str,
    title: str,
    opened_at: datetime,
) -> str:
    alert_id = await conn.fetchval(
        """INSERT INTO alerts (serial, rule, priority, status, title, detail, opened_at,
               updated_at, acknowledged_at, resolved_at, condition_at)
           VALUES ($1, $2, $3, $4, $5, 'What happened and what to do.', $6::timestamptz,
               $6, CASE WHEN $4 = 'acknowledged' THEN $6 + interval '5 minutes' END,
               CASE WHEN $4 = 'resolved' THEN $6 + interval '30 minutes' END, $6)
           RETURNING id""",
        serial,
        rule,
        priority,
        status,
        title,
        opened_at,
    )
    return str(alert_id)


async def _key(conn: asyncpg.Connection, role: keys.Role, clinic_id: str | None = None) -> str:
    _, key = await keys.create(
        conn,
        role=role,
        clinic_id=None if clinic_id is None else uuid.UUID(clinic_id),
        label=f"fhir test {role}",
        created_by="test",
    )
    return key


async def _seed(conn: asyncpg.Connection, client: httpx.AsyncClient, url: str) -> World:
    clinic_a = await fx.clinic(conn, name="Clinic A")
    patient_a = await fx.patient(conn, clinic_a, mrn="MRN-FHIR-A")
    serial_a = "NGPFHIRA01"
    await fx.pump(conn, serial_a, patient_id=patient_a)
    for reading in reversed(READINGS):
        await fx.reading(
            conn,
            serial_a,
            reading.at,
            volume_ml=reading.volume_ml,
            rate_ml_per_day=reading.rate_ml_per_day,
            daily_dose_mcg=reading.daily_dose_mcg,
        )
        await conn.execute(
            "UPDATE readings SET battery_pct = $3, daily_dose_mcg = $4 "
            "WHERE serial = $1 AND recorded_at = $2",
            serial_a,
            reading.at,
            reading.battery_pct,
            reading.daily_dose_mcg,
        )
    clinic_b = await fx.clinic(conn, name="Clinic B")
    patient_b = await fx.patient(conn, clinic_b, mrn="MRN-FHIR-B")
    serial_b = "NGPFHIRB01"
    await fx.pump(conn, serial_b, patient_id=patient_b)
    await fx.reading(conn, serial_b, T0 - timedelta(hours=1))
    unassigned = "NGPFHIRU01"
    await fx.pump(conn, unassigned)
    await fx.reading(conn, unassigned, T0 - timedelta(hours=1))

    def at(hours: int) -> datetime:
        return T0 - timedelta(hours=hours)

    return World(
        client=client,
        database_url=url,
        clinic_a=clinic_a,
        patient_a=patient_a,
        serial_a=serial_a,
        clinic_b=clinic_b,
        patient_b=patient_b,
        serial_b=serial_b,
        unassigned=unassigned,
        open_alert=await _alert(
            conn,
            serial_a,
            rule="refill_due",
            priority="medium",
            status="open",
            title="Refill due in 6 days",
            opened_at=at(3),
        ),
        acknowledged_alert=await _alert(
            conn,
            serial_a,
            rule="battery_eri",
            priority="low",
            status="acknowledged",
            title="Battery nearing replacement",
            opened_at=at(2),
        ),
        resolved_alert=await _alert(
            conn,
            serial_a,
            rule="pump_silent",
            priority="high",
            status="resolved",
            title="No reading for 9 h",
            opened_at=at(1),
        ),
        alert_b=await _alert(
            conn,
            serial_b,
            rule="reservoir_low",
            priority="high",
            status="open",
            title="Reservoir low",
            opened_at=at(4),
        ),
        unassigned_alert=await _alert(
            conn,
            unassigned,
            rule="telemetry_gap",
            priority="low",
            status="open",
            title="Telemetry gap",
            opened_at=at(5),
        ),
        clinician=await _key(conn, "clinician", clinic_a),
        integrator=await _key(conn, "integrator", clinic_a),
        clinician_b=await _key(conn, "clinician", clinic_b),
        admin=await _key(conn, "admin"),
        fleet=await _key(conn, "fleet"),
    )


@pytest.fixture
async def w(database_url: str) -> AsyncIterator[World]:
    app = create_app(ApiSettings(database_url=database_url, api_key_touch_interval_s=0))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("192.0.2.20", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            conn = await asyncpg.connect(database_url)
            try:
                await prepare_connection(conn)
                world = await _seed(conn, client, database_url)
            finally:
                await conn.close()
            yield world


def fhir_body(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == FHIR_JSON
    body = response.json()
    assert isinstance(body, dict)
    return body


def outcome(response: httpx.Response, status: int) -> OperationOutcome:
    found = OperationOutcome.model_validate(fhir_body(response, status))
    assert found.issue, response.text
    assert all(issue.severity == "error" for issue in found.issue)
    return found


def bundle(response: httpx.Response) -> Bundle:
    found = Bundle.model_validate(fhir_body(response))
    assert found.type == "searchset"
    return found


def resources(found: Bundle) -> list[Any]:
    return [entry.resource for entry in found.entry or ()]


def link(found: Bundle, relation: str) -> str | None:
    urls = [item.url for item in found.link or () if item.relation == relation]
    assert len(urls) <= 1
    return urls[0] if urls else None


def when(value: Any) -> datetime:
    """A FHIR dateTime/instant as the model gives it back, as an aware datetime."""
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    assert parsed.tzinfo is not None
    return parsed


# --- Device --------------------------------------------------------------------------------------


async def test_a_pump_is_a_device_with_its_patient_for_clinic_roles(w: World) -> None:
    for key in (w.clinician, w.integrator, w.admin):
        device = Device.model_validate(fhir_body(await w.get(f"/fhir/Device/{w.serial_a}", key)))
        assert device.id == w.serial_a
        assert device.serialNumber == w.serial_a
        assert [(i.system, i.value) for i in device.identifier or ()] == [
            ("urn:pumpwatch:serial", w.serial_a)
        ]
        assert [(n.name, n.type) for n in device.deviceName or ()] == [(MODEL, "model-name")]
        assert device.modelNumber == MODEL
        assert device.status == "active"
        assert device.patient is not None
        assert device.patient.reference == f"Patient/{w.patient_a}"


async def test_the_fleet_role_sees_devices_without_patient_references(w: World) -> None:
    answer = await w.get(f"/fhir/Device/{w.serial_a}", w.fleet)
    device = Device.model_validate(fhir_body(answer))
    assert device.id == w.serial_a
    assert device.patient is None
    assert "Patient/" not in answer.text
    assert w.patient_a not in answer.text
    # An unassigned pump: visible to admins, with no patient.
    unassigned = Device.model_validate(
        fhir_body(await w.get(f"/fhir/Device/{w.unassigned}", w.admin))
    )
    assert unassigned.id == w.unassigned
    assert unassigned.patient is None


async def test_another_clinics_or_an_unknown_pump_is_not_found(w: World) -> None:
    for serial, key in (
        (w.serial_b, w.clinician),
        (w.serial_a, w.clinician_b),
        (w.unassigned, w.integrator),
        ("NGPNOSUCH01", w.admin),
    ):
        answer = await w.get(f"/fhir/Device/{serial}", key)
        found = outcome(answer, 404)
        assert found.issue[0].code == "not-found"
        assert serial not in answer.text
    # The same for a search naming the pump.
    answer = await w.get("/fhir/Observation", w.clinician, device=w.serial_b)
    assert outcome(answer, 404).issue[0].code == "not-found"
    assert w.serial_b not in answer.text


async def test_no_key_is_a_401_outcome_with_the_bearer_challenge(w: World) -> None:
    answer = await w.get(f"/fhir/Device/{w.serial_a}", None)
    assert outcome(answer, 401).issue[0].code == "login"
    assert answer.headers["www-authenticate"].startswith("Bearer")
    answer = await w.get("/fhir/Flag", "pw_not-a-key")
    assert outcome(answer, 401).issue[0].code == "login"


# --- Observation ---------------------------------------------------------------------------------


def _by_reading(found: list[Observation]) -> dict[datetime, dict[str, Observation]]:
    grouped: dict[datetime, dict[str, Observation]] = {}
    for item in found:
        assert item.code.coding is not None
        coding, *others = item.code.coding
        assert coding.system == SYSTEM
        # Then the ISO/IEEE 11073 code where MDC has one, and nothing else.
        assert [(c.system, c.code, c.display) for c in others] == MDC_CODES.get(
            str(coding.code), []
        )
        grouped.setdefault(when(item.effectiveDateTime), {})[str(coding.code)] = item
    return grouped


async def test_observations_carry_each_readings_values_in_ucum_units(w: World) -> None:
    found = bundle(await w.get("/fhir/Observation", w.integrator, device=w.serial_a, _count=500))
    observations = resources(found)
    assert len(observations) == OBSERVATIONS
    assert all(isinstance(o, Observation) for o in observations)
    assert link(found, "next") is None
    assert len({o.id for o in observations}) == OBSERVATIONS
    grouped = _by_reading(observations)
    assert list(grouped) == [r.at for r in READINGS]  # newest first
    for reading in READINGS:
        got = grouped[reading.at]
        assert set(got) == set(reading.values())
        for code, value in reading.values().items():
            item = got[code]
            quantity = item.valueQuantity
            assert quantity is not None
            assert quantity.value is not None
            assert float(quantity.value) == pytest.approx(value)
            assert (quantity.system, quantity.code) == (UCUM, UNITS[code])
            assert item.status == "final"
            assert [
                (c.system, c.code) for cat in item.category or () for c in cat.coding or ()
            ] == [("https://pumpwatch.dev/fhir/CodeSystem/observation-category", "device")]
            assert item.device is not None
            assert item.device.reference == f"Device/{w.serial_a}"
            assert item.subject is not None  # the pump's patient when it read this
            assert item.subject.reference == f"Patient/{w.patient_a}"
            assert when(item.issued) >= reading.at
    # Newest reading first; within a reading, the codes in one fixed order.
    assert [(when(o.effectiveDateTime), o.code.coding[0].code) for o in observations] == [
        (r.at, code) for r in READINGS for code in UNITS if code in r.values()
    ]


async def test_a_device_reference_and_a_bare_serial_find_the_same(w: World) -> None:
    bare = bundle(await w.get("/fhir/Observation", w.clinician, device=w.serial_a))
    referenced = bundle(
        await w.get("/fhir/Observation", w.clinician, device=f"Device/{w.serial_a}")
    )
    assert [o.id for o in resources(bare)] == [o.id for o in resources(referenced)]
    assert len(resources(bare)) == OBSERVATIONS  # the default page holds them all


async def _walk(w: World, key: str, **params: Any) -> list[list[str]]:
    pages: list[list[str]] = []
    answer = await w.get("/fhir/Observation", key, **params)
    while True:
        found = bundle(answer)
        pages.append([o.id for o in resources(found)])
        following = link(found, "next")
        if following is None:
            return pages
        url = httpx.URL(following)
        assert url.host == "api"
        assert url.params.get("device") == params["device"]
        assert url.params.get("_count") == str(params["_count"])
        headers = {"Authorization": f"Bearer {key}"}
        answer = await w.client.get(following, headers=headers)


async def test_observation_pages_follow_next_links_without_gaps_or_repeats(w: World) -> None:
    everything = [
        o.id
        for o in resources(
            bundle(await w.get("/fhir/Observation", w.fleet, device=w.serial_a, _count=500))
        )
    ]
    for count in (1, 3, 4, 5, 17, 18):
        pages = await _walk(w, w.fleet, device=w.serial_a, _count=count)
        assert [o for page in pages for o in page] == everything, count
        assert all(len(page) == count for page in pages[:-1])
        assert 1 <= len(pages[-1]) <= count
    # Readings have 4, 4, 3, 3, 4 Observations: pages of 5 split them 4+1 | 3+2 | 1+3+1 | 3.
    pages = await _walk(w, w.fleet, device=w.serial_a, _count=5)
    assert [len(page) for page in pages] == [5, 5, 5, 3]


async def test_date_parameters_bound_the_readings(w: World) -> None:
    async def times(*dates: str) -> list[datetime]:
        answer = await w.client.get(
            "/fhir/Observation",
            params=[("device", w.serial_a), *(("date", d) for d in dates)],
            headers={"Authorization": f"Bearer {w.clinician}"},
        )
        return list(_by_reading(resources(bundle(answer))))

    def z(at: datetime) -> str:
        return at.strftime("%Y-%m-%dT%H:%M:%SZ")

    hours = [r.at for r in READINGS]  # T0, T0-1h, ..., T0-4h
    assert await times(f"ge{z(hours[2])}", f"lt{z(hours[0])}") == hours[1:3]
    assert await times(f"gt{z(hours[2])}") == hours[:2]  # a second's precision: after it
    assert await times(f"le{z(hours[3])}") == hours[3:]
    assert await times(f"eb{z(hours[3])}") == hours[4:]
    assert await times(f"sa{z(hours[1])}") == hours[:1]
    assert await times(z(hours[1])) == hours[1:2]  # eq: that second
    assert await times(hours[1].strftime("%Y-%m-%dT%H:%MZ")) == hours[1:2]  # that minute
    assert await times("2026-03-10") == hours  # the UTC day
    assert await times("2026-03") == hours
    assert await times("2026") == hours
    assert await times("2026-03-11") == []
    assert await times("lt2026-03-10") == []
    # An offset names the instant it names.
    assert await times("ge2026-03-10T10:00:00+01:00") == hours[:4]  # 09:00Z and later
    assert await times("2026-03-10T06:00:00-05:00") == hours[1:2]  # 11:00Z
    assert await times("ge2026-03-10T12:00Z", "lt2026-03-10T08:00Z") == []


async def test_code_parameters_select_measures(w: World) -> None:
    async def codes(*params: str, count: int = 500) -> list[str]:
        answer = await w.client.get(
            "/fhir/Observation",
            params=[("device", w.serial_a), ("_count", str(count)), *(("code", p) for p in params)],
            headers={"Authorization": f"Bearer {w.clinician}"},
        )
        return [o.code.coding[0].code for o in resources(bundle(answer))]

    assert await codes("battery-remaining") == ["battery-remaining"] * 4
    assert sorted(await codes(f"{SYSTEM}|programmed-dose,{SYSTEM}|reservoir-volume")) == sorted(
        ["programmed-dose"] * 4 + ["reservoir-volume"] * 5
    )
    assert len(await codes(f"{SYSTEM}|")) == OBSERVATIONS
    assert await codes("http://loinc.org|reservoir-volume") == []
    assert await codes("|reservoir-volume") == []
    assert await codes("reservoir-volume", "programmed-rate") == []  # both must hold
    assert await codes("reservoir-volume,programmed-rate", "programmed-rate") == (
        ["programmed-rate"] * 5
    )
    # Pages of a measure only some readings have.
    pages = await _walk(w, w.clinician, device=w.serial_a, _count=3, code="battery-remaining")
    assert [len(page) for page in pages] == [3, 1]


BAD_SEARCHES: list[tuple[dict[str, str | None], int]] = [
    ({"_count": "0"}, 422),
    ({"_count": "501"}, 422),
    ({"_count": "-3"}, 422),
    ({"_count": "ten"}, 422),
    ({"_count": ""}, 422),
    ({"_cursor": "not a cursor!"}, 400),
    ({"_cursor": encode_cursor("2026-03-10T12:00:00+00:00", uuid.uuid4())}, 400),
    ({"_cursor": encode_cursor("yesterday", uuid.uuid4(), 0)}, 400),
    ({"_cursor": encode_cursor("2026-03-10T12:00:00+00:00", "nope", 0)}, 400),
    ({"_cursor": encode_cursor("2026-03-10T12:00:00+00:00", uuid.uuid4(), 4)}, 400),
    ({"_cursor": encode_cursor("2026-03-10T12:00:00+00:00", uuid.uuid4(), "x")}, 400),
    ({"date": "ne2026-03-10"}, 422),
    ({"date": "2026-02-30"}, 422),
    ({"date": "2025-02-29"}, 422),
    ({"date": "2026-03-10T10:00:00"}, 422),  # a time needs an offset
    ({"date": "10/03/2026"}, 422),
    ({"device": "no such pump!"}, 422),
    ({"device": None}, 422),  # required
    ({"code": ""}, 422),
]


async def test_bad_search_parameters_are_4xx_outcomes_never_500(w: World) -> None:
    for params, status in BAD_SEARCHES:
        query = {"device": w.serial_a} | params
        answer = await w.get(
            "/fhir/Observation", w.clinician, **{k: v for k, v in query.items() if v is not None}
        )
        found = outcome(answer, status)
        (issue, *_) = found.issue
        assert issue.code == "invalid", params
        assert issue.details is not None
        assert issue.details.coding is not None
        assert issue.details.coding[0].code == ("bad-cursor" if status == 400 else "validation")
        assert issue.details.text
        if status == 422:  # the parameter at fault is named
            (name,) = params
            assert issue.diagnostics is not None
            assert issue.diagnostics.startswith(f"query.{name}"), (params, issue.diagnostics)


async def test_the_flag_search_rejects_a_bad_count_too(w: World) -> None:
    for count in ("0", "501", "x"):
        outcome(await w.get("/fhir/Flag", w.clinician, _count=count), 422)
    outcome(await w.get("/fhir/Flag", w.clinician, _cursor="%%%"), 400)
    outcome(await w.get("/fhir/Flag", w.clinician, patient="not-a-uuid"), 422)


# --- Flag ----------------------------------------------------------------------------------------


def _extension(item: Flag, name: str) -> Any:
    values = [
        e.valueCode or e.valueString
        for e in item.extension or ()
        if e.url == f"https://pumpwatch.dev/fhir/StructureDefinition/{name}"
    ]
    assert len(values) <= 1
    return values[0] if values else None


async def test_flags_are_the_unresolved_alerts_of_a_patient(w: World) -> None:
    searches: tuple[dict[str, str], ...] = (
        {"patient": w.patient_a},
        {"patient": f"Patient/{w.patient_a}"},
        {"device": w.serial_a},
        {"device": f"Device/{w.serial_a}"},
        {"patient": w.patient_a, "device": w.serial_a},
        {},  # the clinic's
    )
    for params in searches:
        found = bundle(await w.get("/fhir/Flag", w.clinician, **params))
        flags = resources(found)
        assert [f.id for f in flags] == [w.acknowledged_alert, w.open_alert], params
        assert all(isinstance(f, Flag) for f in flags)
        for entry, item in zip(found.entry or (), flags, strict=True):
            assert entry.fullUrl == f"http://api/fhir/Flag/{item.id}"
    acknowledged, opened = resources(bundle(await w.get("/fhir/Flag", w.integrator)))
    assert opened.status == "active"
    assert opened.code.text == "Refill due in 6 days"
    assert [(c.system, c.code) for c in opened.code.coding or ()] == [
        ("https://pumpwatch.dev/fhir/CodeSystem/alert-rule", "refill_due")
    ]
    assert when(opened.period.start) == T0 - timedelta(hours=3)
    assert opened.period.end is None
    assert opened.subject.reference == f"Patient/{w.patient_a}"
    assert opened.author is not None
    assert opened.author.reference == f"Device/{w.serial_a}"
    assert _extension(opened, "alert-priority") == "medium"
    assert _extension(opened, "alert-status") == "open"
    assert _extension(opened, "alert-detail") == "What happened and what to do."
    assert [(i.system, i.value) for i in opened.identifier or ()] == [
        ("urn:pumpwatch:alert", w.open_alert)
    ]
    assert [(c.system, c.code) for cat in opened.category or () for c in cat.coding or ()] == [
        ("http://terminology.hl7.org/CodeSystem/flag-category", "drug")
    ]
    assert acknowledged.status == "active"  # acknowledged is not resolved
    assert _extension(acknowledged, "alert-status") == "acknowledged"
    assert _extension(acknowledged, "alert-priority") == "low"
    assert acknowledged.code.coding[0].code == "battery_eri"


async def test_flags_of_the_fleet_and_of_unassigned_pumps_name_the_device(w: World) -> None:
    answer = await w.get("/fhir/Flag", w.fleet)
    flags = {f.id: f for f in resources(bundle(answer))}
    assert set(flags) == {
        w.open_alert,
        w.acknowledged_alert,
        w.alert_b,
        w.unassigned_alert,
    }
    assert flags[w.alert_b].subject.reference == f"Device/{w.serial_b}"
    assert flags[w.unassigned_alert].subject.reference == f"Device/{w.unassigned}"
    assert "Patient/" not in answer.text
    for patient in (w.patient_a, w.patient_b):
        assert patient not in answer.text
    # Admins see the patients, and the unassigned pump's alert with the pump as its subject.
    flags = {f.id: f for f in resources(bundle(await w.get("/fhir/Flag", w.admin)))}
    assert flags[w.alert_b].subject.reference == f"Patient/{w.patient_b}"
    assert flags[w.unassigned_alert].subject.reference == f"Device/{w.unassigned}"
    device_flags = bundle(await w.get("/fhir/Flag", w.admin, device=w.unassigned))
    assert [f.id for f in resources(device_flags)] == [w.unassigned_alert]


async def test_flag_searches_keep_to_the_keys_clinic(w: World) -> None:
    for params in (
        {"patient": w.patient_b},
        {"device": w.serial_b},
        {"device": w.unassigned},
        {"patient": str(uuid.uuid4())},
    ):
        answer = await w.get("/fhir/Flag", w.clinician, **params)
        assert outcome(answer, 404).issue[0].code == "not-found"
        assert w.patient_b not in answer.text
        assert w.serial_b not in answer.text
    theirs = resources(bundle(await w.get("/fhir/Flag", w.clinician_b)))
    assert [f.id for f in theirs] == [w.alert_b]
    answer = await w.get("/fhir/Flag", w.fleet, patient=w.patient_a)
    assert outcome(answer, 403).issue[0].code == "forbidden"


async def test_flag_pages(w: World) -> None:
    first = bundle(await w.get("/fhir/Flag", w.admin, _count=3))
    assert [f.id for f in resources(first)] == [
        w.acknowledged_alert,
        w.open_alert,
        w.alert_b,
    ]
    following = link(first, "next")
    assert following is not None
    assert httpx.URL(following).params["_count"] == "3"
    second = bundle(await w.client.get(following, headers={"Authorization": f"Bearer {w.admin}"}))
    assert [f.id for f in resources(second)] == [w.unassigned_alert]
    assert link(second, "next") is None
    assert link(second, "self") == following


async def test_a_flag_is_read_by_id_resolved_ones_inactive(w: World) -> None:
    opened = Flag.model_validate(fhir_body(await w.get(f"/fhir/Flag/{w.open_alert}", w.clinician)))
    assert opened.id == w.open_alert
    assert opened.status == "active"
    resolved = Flag.model_validate(
        fhir_body(await w.get(f"/fhir/Flag/{w.resolved_alert}", w.integrator))
    )
    assert resolved.status == "inactive"
    assert _extension(resolved, "alert-status") == "resolved"
    assert resolved.period is not None
    assert when(resolved.period.start) == T0 - timedelta(hours=1)
    assert when(resolved.period.end) == T0 - timedelta(minutes=30)
    fleet_view = await w.get(f"/fhir/Flag/{w.open_alert}", w.fleet)
    assert Flag.model_validate(fhir_body(fleet_view)).subject.reference == f"Device/{w.serial_a}"
    assert "Patient/" not in fleet_view.text
    for alert_id, key in (
        (w.alert_b, w.clinician),
        (w.open_alert, w.clinician_b),
        (w.unassigned_alert, w.integrator),
        (str(uuid.uuid4()), w.admin),
    ):
        assert outcome(await w.get(f"/fhir/Flag/{alert_id}", key), 404).issue[0].code == (
            "not-found"
        )
    outcome(await w.get("/fhir/Flag/not-a-uuid", w.clinician), 422)


# --- audit, OpenAPI, the date grammar ------------------------------------------------------------


async def test_every_fhir_request_is_audited(w: World) -> None:
    await w.get(f"/fhir/Device/{w.serial_a}", w.clinician)
    await w.get(f"/fhir/Device/{w.serial_b}", w.clinician)
    await w.get("/fhir/Observation", w.integrator, device=w.serial_a)
    await w.get("/fhir/Flag", w.fleet)
    await w.get(f"/fhir/Flag/{w.open_alert}", w.clinician)
    conn = await asyncpg.connect(w.database_url)
    try:
        rows = await conn.fetch(
            "SELECT role, action, resource_type, resource_id, outcome, status FROM audit_log "
            "ORDER BY id"
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [
        ("clinician", "get read_device", "fhir", w.serial_a, "ok", 200),
        ("clinician", "get read_device", "fhir", w.serial_b, "denied", 404),
        ("integrator", "get search_observations", "fhir", None, "ok", 200),
        ("fleet", "get search_flags", "fhir", None, "ok", 200),
        ("clinician", "get read_flag", "fhir", w.open_alert, "ok", 200),
    ]


def test_the_openapi_document_describes_the_fhir_routes_with_valid_examples() -> None:
    document = create_app(ApiSettings(database_url="postgresql://unused/unused")).openapi()
    paths = {p: ops for p, ops in document["paths"].items() if p.startswith("/fhir/")}
    assert set(paths) == {
        "/fhir/metadata",
        "/fhir/Device/{serial}",
        "/fhir/Patient",
        "/fhir/Patient/{patient_id}",
        "/fhir/Observation",
        "/fhir/Observation/{observation_id}",
        "/fhir/Flag",
        "/fhir/Flag/{alert_id}",
    }
    models: dict[str, Any] = {
        "Device": Device,
        "Flag": Flag,
        "Bundle": Bundle,
        "Observation": Observation,
        "Patient": Patient,
        "CapabilityStatement": CapabilityStatement,
    }
    for path, operations in paths.items():
        operation = operations["get"]
        assert operation["tags"] == ["fhir"]
        assert operation["summary"]
        assert len(operation["description"]) > 200, path
        ok = operation["responses"]["200"]["content"]
        assert list(ok) == [FHIR_JSON]
        example = ok[FHIR_JSON]["example"]
        models[example["resourceType"]].model_validate(example)
        if path == "/fhir/metadata":
            continue  # no key needed, nothing to refuse
        for status in ("401", "404", "422"):
            error = operation["responses"][status]["content"][FHIR_JSON]
            OperationOutcome.model_validate(error["example"])
            assert error["schema"] == {"$ref": "#/components/schemas/OperationOutcome"}
    search = {p["name"] for p in paths["/fhir/Observation"]["get"]["parameters"]}
    assert search == {"device", "date", "code", "_count", "_cursor"}


@given(st.text(max_size=40) | st.from_regex(fhir.DATE_SEARCH, fullmatch=True))
def test_the_date_pattern_is_exactly_what_is_served(value: str) -> None:
    """What the OpenAPI pattern admits gives bounds, anything else a 422 (never a 500)."""
    answer: tuple[datetime, datetime] | Problem
    try:
        answer = fhir.date_bounds([value])
    except Problem as exc:  # anything else fails the test
        answer = exc
    if re.fullmatch(fhir.DATE_SEARCH, value) is None:
        assert isinstance(answer, Problem)
        assert answer.status == 422
    else:
        assert not isinstance(answer, Problem), answer
        low, high = answer
        assert low.tzinfo is not None
        assert high.tzinfo is not None
