"""FHIR R4 as an integrator's client meets it: ``pumpwatch api`` as a process, read by
SMART on FHIR's ``fhirclient`` (its FHIR R4 4.0.1 models parse every answer) and checked with the
``fhir.resources`` models: the CapabilityStatement, Patient read and search (MRN, name, total,
paging), Device, Observation read by id with the patient as subject, Flag; another clinic's
resources answer 404. And the CSV export is a chunked stream there."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.patient import Patient as R4BPatient
from fhirclient import client as fhir_client
from fhirclient.models.device import Device
from fhirclient.models.flag import Flag
from fhirclient.models.observation import Observation
from fhirclient.models.patient import Patient
from fhirclient.server import FHIRNotFoundException, FHIRPermissionDeniedException

from services.api import keys
from services.storage.database import prepare_connection
from tests import alert_fixtures as fx
from tests.api_support import api_process, scratch_database


@dataclass
class Seeded:
    base: str
    patient_a: str
    serial_a: str
    patient_b: str
    serial_b: str
    alert_a: str
    alert_b: str
    integrator_a: str
    integrator_b: str
    fleet: str


async def _seed(url: str) -> Seeded:
    conn = await asyncpg.connect(url)
    await prepare_connection(conn)
    try:
        made: dict[str, Any] = {}
        for tag in ("A", "B"):
            clinic = await fx.clinic(conn, name=f"Clinic {tag}")
            patient = str(
                await conn.fetchval(
                    "INSERT INTO patients (clinic_id, mrn, display_name, birth_date) "
                    "VALUES ($1, $2, $3, $4) RETURNING id",
                    uuid.UUID(clinic),
                    f"MRN-{tag}-1",
                    f"Ada {tag}lovelace",
                    datetime(1961, 7, 13).date(),
                )
            )
            for n in range(3):  # more patients, for search and paging
                await fx.patient(conn, clinic, mrn=f"MRN-{tag}-X{n}")
            serial = f"NGPR4{tag}0001"
            await fx.pump(conn, serial, patient_id=patient)
            now = datetime.now(UTC)
            for minutes in range(0, 600 * 15, 15):  # 600 readings: more than a CSV chunk
                await fx.reading(conn, serial, now - timedelta(minutes=minutes))
            alert = await conn.fetchval(
                """INSERT INTO alerts (serial, rule, priority, status, title, detail, opened_at,
                       updated_at, condition_at)
                   VALUES ($1, 'refill_due', 'medium', 'open', 'Refill due in 6 days',
                       'detail', now(), now(), now()) RETURNING id""",
                serial,
            )
            made[tag] = (clinic, patient, serial, str(alert))
        _, integrator = await keys.create(
            conn,
            role="integrator",
            clinic_id=uuid.UUID(made["A"][0]),
            label="fhir client",
            created_by="test",
        )
        _, integrator_b = await keys.create(
            conn,
            role="integrator",
            clinic_id=uuid.UUID(made["B"][0]),
            label="fhir client B",
            created_by="test",
        )
        _, fleet = await keys.create(
            conn, role="fleet", clinic_id=None, label="fleet", created_by="test"
        )
    finally:
        await conn.close()
    return Seeded(
        "",
        made["A"][1],
        made["A"][2],
        made["B"][1],
        made["B"][2],
        made["A"][3],
        made["B"][3],
        integrator,
        integrator_b,
        fleet,
    )


@pytest.fixture(scope="module")
def seeded(
    pg_admin_url: str, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seeded]:
    with scratch_database(pg_admin_url, template_database, "pw_fhir_r4") as url:
        found = asyncio.run(_seed(url))
        with api_process(url, Path(tmp_path_factory.mktemp("fhir"))) as api:
            found.base = api.base
            yield found
    errors = api.unhandled_errors()
    assert not errors, "\n".join(errors)


def first(search: Any, server: Any) -> Any:
    """The first page (a Bundle) of a search, as the client reads it."""
    return next(search.perform_iter(server))


def smart(base: str, key: str) -> Any:
    """A fhirclient client of the API's FHIR base, sending the key as a bearer token."""
    found = fhir_client.FHIRClient(
        settings={"app_id": "pumpwatch-tests", "api_base": f"{base}/fhir/"}
    )
    found.server.session.headers["Authorization"] = f"Bearer {key}"
    return found


def test_the_capability_statement_says_r4_and_only_what_is_served(seeded: Seeded) -> None:
    answer = httpx.get(f"{seeded.base}/fhir/metadata")  # no key: discovery comes first
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/fhir+json"
    statement = CapabilityStatement.model_validate(answer.json())
    assert statement.fhirVersion == "4.0.1"
    [rest] = statement.rest or []
    served = {r.type: r for r in rest.resource or []}
    assert set(served) == {"Device", "Flag", "Observation", "Patient"}
    assert {i.code for i in served["Device"].interaction or []} == {"read"}
    for kind in ("Flag", "Observation", "Patient"):
        assert {i.code for i in served[kind].interaction or []} == {"read", "search-type"}
    assert {p.name for p in served["Patient"].searchParam or []} == {"identifier", "name"}
    assert {p.name for p in served["Observation"].searchParam or []} == {"device", "date", "code"}
    # The client library reads it as an R4 CapabilityStatement.
    client = smart(seeded.base, seeded.integrator_a)
    client.server.get_capability()
    assert client.server.capabilityStatement.fhirVersion == "4.0.1"


def test_a_clinic_key_reads_its_patient_device_observation_and_flag(seeded: Seeded) -> None:
    server = smart(seeded.base, seeded.integrator_a).server
    patient = Patient.read(seeded.patient_a, server)
    assert patient.identifier[0].value == "MRN-A-1"
    assert patient.identifier[0].type.coding[0].code == "MR"
    assert patient.name[0].text == "Ada Alovelace"
    assert patient.birthDate.isostring == "1961-07-13"
    device = Device.read(seeded.serial_a, server)
    assert device.patient.reference == f"Patient/{seeded.patient_a}"
    newest = first(
        Observation.where(
            struct={"device": seeded.serial_a, "code": "reservoir-volume", "_count": "1"}
        ),
        server,
    )
    assert newest.total == 600
    [entry] = newest.entry
    assert entry.fullUrl == f"{seeded.base}/fhir/Observation/{entry.resource.id}"
    observation = Observation.read(entry.resource.id, server)
    assert observation.as_json() == entry.resource.as_json()
    assert observation.subject.reference == f"Patient/{seeded.patient_a}"
    assert observation.device.reference == f"Device/{seeded.serial_a}"
    assert observation.valueQuantity.system == "http://unitsofmeasure.org"
    # The reading as a panel: found by its code, read by its id, its members read in turn.
    panels = first(
        Observation.where(
            struct={"device": seeded.serial_a, "code": "pump-reading", "_count": "1"}
        ),
        server,
    )
    assert panels.total == 600
    panel = Observation.read(panels.entry[0].resource.id, server)
    assert panel.code.coding[0].code == "pump-reading"
    assert panel.valueQuantity is None
    assert panel.subject.reference == f"Patient/{seeded.patient_a}"
    members = [Observation.read(m.reference.split("/", 1)[1], server) for m in panel.hasMember]
    assert [m.code.coding[0].code for m in members] == [
        "reservoir-volume",
        "programmed-rate",
        "programmed-dose",
    ]  # the fixture's readings report no battery level
    assert {m.effectiveDateTime.isostring for m in members} == {panel.effectiveDateTime.isostring}
    assert observation.id in {m.id for m in members}  # the newest reading's volume
    flag = Flag.read(seeded.alert_a, server)
    assert flag.subject.reference == f"Patient/{seeded.patient_a}"
    assert flag.status == "active"


def test_another_clinics_resources_are_not_found(seeded: Seeded) -> None:
    server = smart(seeded.base, seeded.integrator_a).server
    theirs = (
        first(Observation.where(struct={"device": seeded.serial_a, "_count": "1"}), server)
        .entry[0]
        .resource.id.replace(seeded.serial_a, seeded.serial_b)
    )
    b_server = smart(seeded.base, seeded.integrator_b).server
    their_panel = (
        first(
            Observation.where(
                struct={"device": seeded.serial_b, "code": "pump-reading", "_count": "1"}
            ),
            b_server,
        )
        .entry[0]
        .resource.id
    )
    their_volume = (
        first(Observation.where(struct={"device": seeded.serial_b, "_count": "1"}), b_server)
        .entry[0]
        .resource.id
    )
    # Each is clinic B's to read: A's 404s below are tenancy, not ids that name nothing.
    Patient.read(seeded.patient_b, b_server)
    Device.read(seeded.serial_b, b_server)
    Observation.read(their_panel, b_server)
    Observation.read(their_volume, b_server)
    Flag.read(seeded.alert_b, b_server)
    for kind, ident in (
        (Patient, seeded.patient_b),
        (Device, seeded.serial_b),
        (Observation, theirs),
        (Observation, their_volume),
        (Observation, their_panel),
        (Flag, seeded.alert_b),
        (Patient, str(uuid.uuid4())),
    ):
        with pytest.raises(FHIRNotFoundException):
            kind.read(ident, server)


def test_patients_are_found_by_mrn_and_name_with_a_total(seeded: Seeded) -> None:
    server = smart(seeded.base, seeded.integrator_a).server
    by_mrn = first(Patient.where(struct={"identifier": "MRN-A-1"}), server)
    assert by_mrn.total == 1
    assert [e.resource.id for e in by_mrn.entry] == [seeded.patient_a]
    system = by_mrn.entry[0].resource.identifier[0].system
    assert system.startswith("urn:pumpwatch:mrn:")
    with_system = first(Patient.where(struct={"identifier": f"{system}|MRN-A-1"}), server)
    assert with_system.total == 1
    assert first(Patient.where(struct={"identifier": "MRN-B-1"}), server).total == 0
    assert first(Patient.where(struct={"identifier": "other|MRN-A-1"}), server).total == 0
    for text in ("ada", "ALOVE", "Ada A"):
        found = first(Patient.where(struct={"name": text}), server)
        assert [e.resource.id for e in found.entry] == [seeded.patient_a], text
    assert first(Patient.where(struct={"name": "lovelace"}), server).total == 0
    # Every patient of the clinic, two a page, by the client following the next links; the
    # total is the whole count on every page.
    pages = list(Patient.where(struct={"_count": "2"}).perform_iter(server))
    assert len(pages) == 2
    assert {page.total for page in pages} == {4}
    seen: list[str] = [e.resource.id for page in pages for e in page.entry]
    assert len(seen) == len(set(seen)) == 4
    for entry_id in seen:
        R4BPatient.model_validate(
            httpx.get(
                f"{seeded.base}/fhir/Patient/{entry_id}",
                headers={"Authorization": f"Bearer {seeded.integrator_a}"},
            ).json()
        )


def test_the_fleet_sees_no_patients(seeded: Seeded) -> None:
    server = smart(seeded.base, seeded.fleet).server
    with pytest.raises(FHIRPermissionDeniedException):
        Patient.read(seeded.patient_a, server)
    observations = first(
        Observation.where(struct={"device": seeded.serial_a, "_count": "3"}), server
    )
    assert {e.resource.subject.reference for e in observations.entry} == {
        f"Device/{seeded.serial_a}"
    }


def test_the_telemetry_csv_is_a_chunked_stream(seeded: Seeded) -> None:
    headers = {"Authorization": f"Bearer {seeded.integrator_a}"}
    with httpx.stream(
        "GET", f"{seeded.base}/v1/pumps/{seeded.serial_a}/telemetry.csv", headers=headers
    ) as answer:
        assert answer.status_code == 200
        assert answer.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in answer.headers
        lines = sum(chunk.count("\n") for chunk in answer.iter_text())
    assert lines == 1 + 600
