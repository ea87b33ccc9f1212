"""FHIR R4 grouping of a reading's Observations: each reading is a panel Observation whose
``hasMember`` are its measures' Observations, read by its id, found by its code (alone or with
measures, across pages), limited by custody like its members; and the ISO/IEEE 11073 (MDC) codes
beside ours find the measures they name. Every body is validated with the ``fhir.resources``
R4B models; the world is test_api_fhir's."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.observation import Observation

from services.api.app import create_app
from services.api.fhir.patients import capability_statement
from services.api.fhir.resources import parse_observation_id
from services.api.settings import ApiSettings
from services.storage.database import prepare_connection
from tests import alert_fixtures as fx
from tests.test_api_fhir import (
    MDC,
    READINGS,
    SYSTEM,
    World,
    _seed,
    bundle,
    fhir_body,
    link,
    outcome,
    resources,
    when,
)

PANEL_SYSTEM = "https://pumpwatch.dev/fhir/CodeSystem/pump-panel"
LETTERS = {
    "reservoir-volume": "v",
    "programmed-rate": "r",
    "programmed-dose": "d",
    "battery-remaining": "b",
}


@pytest.fixture
async def w(database_url: str) -> AsyncIterator[World]:
    app = create_app(ApiSettings(database_url=database_url, api_key_touch_interval_s=0))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("192.0.2.21", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            conn = await asyncpg.connect(database_url)
            try:
                await prepare_connection(conn)
                world = await _seed(conn, client, database_url)
            finally:
                await conn.close()
            yield world


async def _search(w: World, key: str, *codes: str, count: int = 500) -> Any:
    answer = await w.client.get(
        "/fhir/Observation",
        params=[("device", w.serial_a), ("_count", str(count)), *(("code", c) for c in codes)],
        headers={"Authorization": f"Bearer {key}"},
    )
    return bundle(answer)


def _code(item: Any) -> tuple[str, str]:
    coding = item.code.coding[0]
    return str(coding.system), str(coding.code)


def _is_panel(item: Any) -> bool:
    return _code(item) == (PANEL_SYSTEM, "pump-reading")


async def test_each_reading_is_a_panel_of_its_measures(w: World) -> None:
    found = await _search(w, w.integrator, "pump-reading")
    panels = resources(found)
    assert found.total == len(READINGS)
    assert [when(p.effectiveDateTime) for p in panels] == [r.at for r in READINGS]
    measures = {
        o.id: o
        for o in resources(
            bundle(await w.get("/fhir/Observation", w.integrator, device=w.serial_a, _count=500))
        )
    }
    for reading, item in zip(READINGS, panels, strict=True):
        assert item.get_resource_type() == "Observation"
        assert _is_panel(item)
        assert item.code.text == "Pump reading"
        assert item.status == "final"
        # A group: no value of its own, the reading's measures as members.
        assert item.valueQuantity is None
        assert item.component is None
        members = [str(m.reference) for m in item.hasMember or ()]
        assert members == [
            f"Observation/{item.id}.{LETTERS[code]}" for code in LETTERS if code in reading.values()
        ]
        for member in members:
            measure = measures[member.removeprefix("Observation/")]
            assert when(measure.effectiveDateTime) == reading.at
            assert measure.hasMember is None
            assert measure.derivedFrom is None
        assert item.subject.reference == f"Patient/{w.patient_a}"
        assert item.device.reference == f"Device/{w.serial_a}"
        assert when(item.issued) >= reading.at
        [identifier] = item.identifier
        assert identifier.system == "urn:pumpwatch:reading"
        uuid.UUID(identifier.value)  # the reading's id
        assert item.id.count(".") == 2  # {serial}.{time}.{reading}
        # Read by its id, it is what the search found; so is each member.
        read = Observation.model_validate(
            fhir_body(await w.get(f"/fhir/Observation/{item.id}", w.clinician))
        )
        assert read.model_dump() == item.model_dump()
        for member in members:
            one = fhir_body(await w.get(f"/fhir/{member}", w.clinician))
            assert Observation.model_validate(one).id == member.removeprefix("Observation/")
    # Without a code, or with one of the measures' systems, no panel is found.
    for codes in ((), (f"{SYSTEM}|",), (f"{MDC}|",), (f"{SYSTEM}|pump-reading",)):
        assert not any(_is_panel(o) for o in resources(await _search(w, w.clinician, *codes)))
    assert (await _search(w, w.clinician, f"{PANEL_SYSTEM}|")).total == len(READINGS)
    assert (await _search(w, w.clinician, f"{PANEL_SYSTEM}|pump-reading")).total == len(READINGS)
    assert (await _search(w, w.clinician, "pump-reading", "reservoir-volume")).total == 0


async def test_panels_and_measures_page_together_panel_first(w: World) -> None:
    together = await _search(w, w.clinician, "pump-reading,reservoir-volume,battery-remaining")
    items = resources(together)
    batteries = sum(1 for r in READINGS if r.battery_pct is not None)
    assert together.total == len(items) == 2 * len(READINGS) + batteries
    # Newest reading first; within one, the panel, then the measures in their fixed order.
    expected = []
    for reading in READINGS:
        expected.append((reading.at, (PANEL_SYSTEM, "pump-reading")))
        expected.append((reading.at, (SYSTEM, "reservoir-volume")))
        if reading.battery_pct is not None:
            expected.append((reading.at, (SYSTEM, "battery-remaining")))
    assert [(when(o.effectiveDateTime), _code(o)) for o in items] == expected
    everything = [o.id for o in items]
    for count in (1, 2, 3, 4, 13):
        pages: list[list[str]] = []
        page = await _search(
            w, w.fleet, "pump-reading,reservoir-volume,battery-remaining", count=count
        )
        while True:
            assert page.total == len(everything)
            pages.append([o.id for o in resources(page)])
            following = link(page, "next")
            if following is None:
                break
            answer = await w.client.get(following, headers={"Authorization": f"Bearer {w.fleet}"})
            page = bundle(answer)
        assert [i for found in pages for i in found] == everything, count
        assert all(len(found) == count for found in pages[:-1])


async def test_mdc_codes_find_the_measures_they_name(w: World) -> None:
    async def codes(*params: str) -> list[str]:
        found = resources(await _search(w, w.clinician, *params))
        return [o.code.coding[0].code for o in found]

    with_battery = sum(1 for r in READINGS if r.battery_pct is not None)
    with_dose = sum(1 for r in READINGS if r.daily_dose_mcg is not None)
    assert await codes(f"{MDC}|67996") == ["battery-remaining"] * with_battery
    assert await codes("157784") == ["programmed-rate"] * len(READINGS)  # any system
    assert await codes(f"{MDC}|157924") == ["programmed-dose"] * with_dose
    assert sorted(await codes(f"{MDC}|")) == sorted(
        ["programmed-rate"] * len(READINGS)
        + ["programmed-dose"] * with_dose
        + ["battery-remaining"] * with_battery
    )
    assert await codes(f"{SYSTEM}|67996") == []  # MDC's code in our system: nothing
    assert await codes(f"{MDC}|battery-remaining") == []
    assert await codes(f"{MDC}|157872") == []  # no measure of ours has this code


async def test_another_clinics_or_an_unknown_panel_is_not_found(w: World) -> None:
    [newest, *_] = resources(await _search(w, w.clinician, "pump-reading"))
    for ident, key in (
        (newest.id, w.clinician_b),
        (newest.id.replace(w.serial_a, w.serial_b), w.clinician),
        (newest.id[:-8] + "00000000", w.admin),  # no reading with this id at this time
    ):
        answer = await w.get(f"/fhir/Observation/{ident}", key)
        assert outcome(answer, 404).issue[0].code == "not-found"
        assert w.patient_a not in answer.text
    fleet = await w.get(f"/fhir/Observation/{newest.id}", w.fleet)
    panel: Any = Observation.model_validate(fhir_body(fleet))
    assert panel.subject.reference == f"Device/{w.serial_a}"
    assert "Patient/" not in fleet.text


async def test_a_clinic_reads_the_panels_of_its_periods_only(w: World) -> None:
    """The pump moves from clinic A to clinic B: each reads the panels of the readings taken
    while it held the pump, and the panel of the other's period is not found."""
    before = resources(await _search(w, w.clinician, "pump-reading"))[0]
    moved = await w.client.put(
        f"/v1/pumps/{w.serial_a}",
        json={"clinic_id": w.clinic_b, "patient_id": w.patient_b},
        headers={"Authorization": f"Bearer {w.admin}"},
    )
    assert moved.status_code == 200, moved.text
    conn = await asyncpg.connect(w.database_url)
    try:
        await prepare_connection(conn)
        since: datetime = await conn.fetchval(
            "SELECT since FROM pump_assignments WHERE serial = $1 AND until IS NULL", w.serial_a
        )
        await fx.reading(conn, w.serial_a, since + timedelta(milliseconds=1))
    finally:
        await conn.close()
    after = resources(await _search(w, w.clinician_b, "pump-reading"))
    assert [when(p.effectiveDateTime) for p in after] == [since + timedelta(milliseconds=1)]
    [later] = after
    assert later.subject.reference == f"Patient/{w.patient_b}"
    own = [p.id for p in resources(await _search(w, w.clinician, "pump-reading"))]
    assert len(own) == len(READINGS)  # A's period: the later reading is not A's
    assert own[0] == before.id
    assert later.id not in own
    for ident, key, status in (
        (before.id, w.clinician, 200),
        (before.id, w.clinician_b, 404),
        (later.id, w.clinician_b, 200),
        (later.id, w.clinician, 404),
    ):
        answer = await w.get(f"/fhir/Observation/{ident}", key)
        assert answer.status_code == status, (ident, key == w.clinician, answer.text)
        if status == 200:
            Observation.model_validate(fhir_body(answer))


def test_the_openapi_document_shows_a_valid_panel_with_the_read_route() -> None:
    document = create_app(ApiSettings(database_url="postgresql://unused/unused")).openapi()
    read = document["paths"]["/fhir/Observation/{observation_id}"]["get"]
    found = re.search(r"```json\n(.*?)\n```", read["description"], re.DOTALL)
    assert found is not None
    example: Any = Observation.model_validate(json.loads(found.group(1)))
    assert _is_panel(example)
    parsed = parse_observation_id(str(example.id))
    assert parsed is not None
    serial, at, reading, measure = parsed
    assert measure is None
    assert at == when(example.effectiveDateTime)
    assert [m.reference for m in example.hasMember or ()] == [
        f"Observation/{serial}.{example.id.split('.')[1]}.{reading}.{letter}" for letter in "vrdb"
    ]
    # The search documents the panel's code, and the CapabilityStatement's `code` parameter too.
    search = document["paths"]["/fhir/Observation"]["get"]
    assert "pump-reading" in search["description"]
    assert PANEL_SYSTEM in search["description"]
    statement = CapabilityStatement.model_validate(capability_statement("http://api/fhir", "1"))
    [rest] = statement.rest or []
    [observations] = [r for r in rest.resource or [] if r.type == "Observation"]
    [code] = [p for p in observations.searchParam or [] if p.name == "code"]
    assert "pump-reading" in str(code.documentation)
