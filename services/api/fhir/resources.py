"""FHIR R4 resources of our rows: ``Device`` (a pump), ``Observation`` (one measure of a
reading, in UCUM units, and the reading itself as a panel of them), ``Flag`` (an alert) and the
searchset ``Bundle`` of a search; the code systems and extensions they use, and beside each
mapping the example the OpenAPI document shows."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
from fastapi import Request
from fastapi.responses import JSONResponse

from services.api.auth import Principal

FHIR_JSON = "application/fhir+json"

SERIAL_SYSTEM = "urn:pumpwatch:serial"
READING_SYSTEM = "urn:pumpwatch:reading"
"""An Observation's identifier: ``{reading id}-{measure code}`` (its id up to pumpwatch 1.1)."""
ALERT_SYSTEM = "urn:pumpwatch:alert"
OBSERVATION_SYSTEM = "https://pumpwatch.dev/fhir/CodeSystem/pump-observation"
PANEL_SYSTEM = "https://pumpwatch.dev/fhir/CodeSystem/pump-panel"
"""The code of a reading's panel Observation (its own system: ``pump-observation|`` keeps
selecting the measures only)."""
PANEL_CODE = "pump-reading"
PANEL_DISPLAY = "Pump reading"
MDC = "urn:iso:std:iso:11073:10101"
"""ISO/IEEE 11073-10101 (MDC), the nomenclature of point-of-care devices; its FHIR system URI as
HL7's Personal Health Device IG uses it."""
CATEGORY_SYSTEM = "https://pumpwatch.dev/fhir/CodeSystem/observation-category"
RULE_SYSTEM = "https://pumpwatch.dev/fhir/CodeSystem/alert-rule"
PRIORITY_EXTENSION = "https://pumpwatch.dev/fhir/StructureDefinition/alert-priority"
ALERT_STATUS_EXTENSION = "https://pumpwatch.dev/fhir/StructureDefinition/alert-status"
DETAIL_EXTENSION = "https://pumpwatch.dev/fhir/StructureDefinition/alert-detail"
FLAG_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/flag-category"
UCUM = "http://unitsofmeasure.org"


@dataclass(frozen=True, slots=True)
class Measure:
    """One Observation code: which reading column it reports, in which UCUM unit."""

    code: str
    letter: str
    """The measure in an Observation id."""
    display: str
    column: str
    unit: str
    """Human-readable unit (``Quantity.unit``)."""
    ucum: str
    """UCUM code (``Quantity.code``)."""
    mdc: tuple[str, str] | None = None
    """The IEEE 11073-10101 (MDC) code and reference id that means the same, when one does."""


# MDC codes, each taken from a published source, none guessed (LOINC has none for these):
# - 157784 MDC_FLOW_FLUID_PUMP ("Rate" of an infusion source) and 157924 MDC_RATE_DOSE ("Dose
#   Rate"): IHE Patient Care Device Technical Framework vol. 2, the infusion pump parameters
#   table and its PCD-01 example message (repository IHEPCD/ihe-pcd-tf-2020,
#   docx/tf-v2-orig.txt, commit 6cec01a7).
# - 67996 MDC_ATTR_VAL_BATT_CHARGE (battery level, in %): HL7's Personal Health Device IG,
#   example input/examples/bundle-continuousnonin.json (repository HL7/phd, commit 5af8412f),
#   an Observation of this code with a UCUM `%` quantity.
# The reservoir volume has none: the closest, 157872 MDC_VOL_FLUID_TBI_REMAIN, is the volume of
# an infusion program still to be infused, not the drug in a reservoir, and MDC_INS_RESERVOIR
# is an insulin pump's.
MEASURES: tuple[Measure, ...] = (
    Measure("reservoir-volume", "v", "Reservoir volume", "volume_ml", "mL", "mL"),
    Measure(
        "programmed-rate",
        "r",
        "Programmed infusion rate",
        "rate_ml_per_day",
        "mL/d",
        "mL/d",
        ("157784", "MDC_FLOW_FLUID_PUMP"),
    ),
    Measure(
        "programmed-dose",
        "d",
        "Programmed daily dose",
        "daily_dose_mcg",
        "µg/d",
        "ug/d",
        ("157924", "MDC_RATE_DOSE"),
    ),
    Measure(
        "battery-remaining",
        "b",
        "Battery remaining",
        "battery_pct",
        "%",
        "%",
        ("67996", "MDC_ATTR_VAL_BATT_CHARGE"),
    ),
)
OBSERVATION_ID = re.compile(
    r"(?P<serial>[A-Za-z0-9-]{4,32})\.(?P<time>-?[0-9a-z]{1,12})\.(?P<reading>[0-9a-f]{8})"
    r"(\.(?P<measure>[vrdb]))?"
)
"""A measure's Observation id; without the measure's letter, the reading's panel."""


class FhirResponse(JSONResponse):
    media_type = FHIR_JSON


# --- OpenAPI: schemas and examples for integrators -----------------------------------------------

EXAMPLE_SERIAL = "NGP204519H"
EXAMPLE_PATIENT = "6f1c2f4e-8d7a-4a53-9a43-2b1f0c9e7d11"
EXAMPLE_ALERT = "0b8e3c52-5f55-4c1e-9a7e-3f0d1c2b4a6e"
_EXAMPLE_READING = "3d9b7c0a-1e2f-4a5b-8c6d-7e8f9a0b1c2d"
EXAMPLE_BASE = "https://pumpwatch.example.org/fhir"


def _resource_schema(resource_type: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": f"A FHIR R4 {resource_type} "
        f"(https://hl7.org/fhir/R4/{resource_type.lower()}.html), JSON format.",
        "required": ["resourceType"],
        "properties": {"resourceType": {"type": "string", "enum": [resource_type]}},
        "additionalProperties": True,
    }


def ok(resource_type: str, example: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {FHIR_JSON: {"schema": _resource_schema(resource_type), "example": example}},
    }


# --- resources, each followed by the example the OpenAPI document shows of it --------------------


def instant(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _reference(kind: str, ident: object) -> dict[str, str]:
    return {"reference": f"{kind}/{ident}"}


def device(row: asyncpg.Record, principal: Principal) -> dict[str, Any]:
    serial = row["serial"]
    model = row["model"] or row["registered_model"]
    resource: dict[str, Any] = {
        "resourceType": "Device",
        "id": serial,
        "identifier": [{"system": SERIAL_SYSTEM, "value": serial}],
        "status": "active",
        "serialNumber": serial,
    }
    if model and model.strip():  # FHIR strings are never blank
        resource["deviceName"] = [{"name": model, "type": "model-name"}]
        resource["modelNumber"] = model
    if principal.identified and row["patient_id"] is not None:
        resource["patient"] = _reference("Patient", row["patient_id"])
    return resource


DEVICE_EXAMPLE: dict[str, Any] = {
    "resourceType": "Device",
    "id": EXAMPLE_SERIAL,
    "identifier": [{"system": SERIAL_SYSTEM, "value": EXAMPLE_SERIAL}],
    "status": "active",
    "serialNumber": EXAMPLE_SERIAL,
    "deviceName": [{"name": "SynchroMed II 8637-40", "type": "model-name"}],
    "modelNumber": "SynchroMed II 8637-40",
    "patient": {"reference": f"Patient/{EXAMPLE_PATIENT}"},
}


_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _base36(number: int) -> str:
    if number < 0:
        return "-" + _base36(-number)
    digits = ""
    while True:
        number, digit = divmod(number, 36)
        digits = _BASE36[digit] + digits
        if number == 0:
            return digits


def observation_id(
    serial: str, recorded_at: datetime, msg_id: UUID, measure: Measure | None
) -> str:
    """``{serial}.{time}.{reading}.{measure}``: the reading's time (microseconds since 1970 in
    base 36) and serial find it through the readings' index; the first 8 hex digits of its id
    tell readings of one instant apart; the measure is its letter (None: the reading's panel,
    ``{serial}.{time}.{reading}``). At most 55 characters (FHIR ids: 64)."""
    micros = (recorded_at - _EPOCH) // timedelta(microseconds=1)
    panel = f"{serial}.{_base36(micros)}.{msg_id.hex[:8]}"
    return panel if measure is None else f"{panel}.{measure.letter}"


def parse_observation_id(value: str) -> tuple[str, datetime, str, Measure | None] | None:
    """The serial, time, reading id prefix and measure (None: the panel) of an Observation id,
    or None."""
    found = OBSERVATION_ID.fullmatch(value)
    if found is None:
        return None
    micros = int(found["time"], 36)
    try:
        at = _EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        return None
    letter = found["measure"]
    measure = None if letter is None else next(m for m in MEASURES if m.letter == letter)
    return found["serial"], at, found["reading"], measure


def _codings(measure: Measure) -> list[dict[str, str]]:
    codings = [{"system": OBSERVATION_SYSTEM, "code": measure.code, "display": measure.display}]
    if measure.mdc is not None:
        code, reference_id = measure.mdc
        codings.append({"system": MDC, "code": code, "display": reference_id})
    return codings


def _subject(serial: str, patient_id: UUID | None) -> dict[str, str]:
    if patient_id is not None:
        return _reference("Patient", patient_id)
    return _reference("Device", serial)


_DEVICE_CATEGORY = [
    {"coding": [{"system": CATEGORY_SYSTEM, "code": "device", "display": "Device telemetry"}]}
]


def observation(
    row: asyncpg.Record, measure: Measure, serial: str, patient_id: UUID | None
) -> dict[str, Any]:
    """One measure of a reading. ``subject`` is the patient the pump was assigned to when the
    reading was taken (None: nobody, or the fleet role), else the pump itself. ``code`` is
    pumpwatch's, then MDC's where MDC has one."""
    return {
        "resourceType": "Observation",
        "id": observation_id(serial, row["recorded_at"], row["msg_id"], measure),
        "identifier": [{"system": READING_SYSTEM, "value": f"{row['msg_id']}-{measure.code}"}],
        "status": "final",
        "category": _DEVICE_CATEGORY,
        "code": {"coding": _codings(measure), "text": measure.display},
        "subject": _subject(serial, patient_id),
        "effectiveDateTime": instant(row["recorded_at"]),
        "issued": instant(row["received_at"]),
        "valueQuantity": {
            "value": row[measure.column],
            "unit": measure.unit,
            "system": UCUM,
            "code": measure.ucum,
        },
        "device": _reference("Device", serial),
    }


OBSERVATION_EXAMPLE: dict[str, Any] = {
    "resourceType": "Observation",
    "id": f"{EXAMPLE_SERIAL}.hobyoim4g0.3d9b7c0a.v",
    "identifier": [
        {"system": "urn:pumpwatch:reading", "value": f"{_EXAMPLE_READING}-reservoir-volume"}
    ],
    "status": "final",
    "category": [
        {"coding": [{"system": CATEGORY_SYSTEM, "code": "device", "display": "Device telemetry"}]}
    ],
    "code": {
        "coding": [
            {
                "system": OBSERVATION_SYSTEM,
                "code": "reservoir-volume",
                "display": "Reservoir volume",
            }
        ],
        "text": "Reservoir volume",
    },
    "subject": {"reference": f"Patient/{EXAMPLE_PATIENT}"},
    "effectiveDateTime": "2026-11-20T08:30:00Z",
    "issued": "2026-11-20T08:30:02.113Z",
    "valueQuantity": {"value": 17.42, "unit": "mL", "system": UCUM, "code": "mL"},
    "device": {"reference": f"Device/{EXAMPLE_SERIAL}"},
}


def panel(row: asyncpg.Record, serial: str, patient_id: UUID | None) -> dict[str, Any]:
    """The reading as a whole: a panel (FHIR's grouping of Observations) with no value of its
    own, its measures' Observations as ``hasMember``. The members name no panel (R4 has no
    element for it; ``derivedFrom`` would say a value was computed from another)."""
    members = [
        {"reference": f"Observation/{observation_id(serial, row['recorded_at'], row['msg_id'], m)}"}
        for m in MEASURES
        if row[m.column] is not None
    ]
    return {
        "resourceType": "Observation",
        "id": observation_id(serial, row["recorded_at"], row["msg_id"], None),
        "identifier": [{"system": READING_SYSTEM, "value": str(row["msg_id"])}],
        "status": "final",
        "category": _DEVICE_CATEGORY,
        "code": {
            "coding": [{"system": PANEL_SYSTEM, "code": PANEL_CODE, "display": PANEL_DISPLAY}],
            "text": PANEL_DISPLAY,
        },
        "subject": _subject(serial, patient_id),
        "effectiveDateTime": instant(row["recorded_at"]),
        "issued": instant(row["received_at"]),
        "device": _reference("Device", serial),
        "hasMember": members,
    }


PANEL_EXAMPLE: dict[str, Any] = {
    "resourceType": "Observation",
    "id": f"{EXAMPLE_SERIAL}.hobyoim4g0.3d9b7c0a",
    "identifier": [{"system": "urn:pumpwatch:reading", "value": _EXAMPLE_READING}],
    "status": "final",
    "category": [
        {"coding": [{"system": CATEGORY_SYSTEM, "code": "device", "display": "Device telemetry"}]}
    ],
    "code": {
        "coding": [{"system": PANEL_SYSTEM, "code": PANEL_CODE, "display": PANEL_DISPLAY}],
        "text": PANEL_DISPLAY,
    },
    "subject": {"reference": f"Patient/{EXAMPLE_PATIENT}"},
    "effectiveDateTime": "2026-11-20T08:30:00Z",
    "issued": "2026-11-20T08:30:02.113Z",
    "device": {"reference": f"Device/{EXAMPLE_SERIAL}"},
    "hasMember": [
        {"reference": f"Observation/{EXAMPLE_SERIAL}.hobyoim4g0.3d9b7c0a.{letter}"}
        for letter in "vrdb"
    ],
}


def flag(row: asyncpg.Record, principal: Principal) -> dict[str, Any]:
    alert_id, serial = str(row["id"]), row["serial"]
    resolved = row["status"] == "resolved"
    subject = (
        _reference("Patient", row["patient_id"])
        if principal.identified and row["patient_id"] is not None
        else _reference("Device", serial)
    )
    period = {"start": instant(row["opened_at"])}
    if resolved and row["resolved_at"] is not None:
        period["end"] = instant(row["resolved_at"])
    extensions = [
        {"url": PRIORITY_EXTENSION, "valueCode": row["priority"]},
        {"url": ALERT_STATUS_EXTENSION, "valueCode": row["status"]},
    ]
    if row["detail"].strip():  # FHIR strings are never blank
        extensions.append({"url": DETAIL_EXTENSION, "valueString": row["detail"]})
    code: dict[str, Any] = {"coding": [{"system": RULE_SYSTEM, "code": row["rule"]}]}
    if row["title"].strip():
        code["text"] = row["title"]
    return {
        "resourceType": "Flag",
        "id": alert_id,
        "meta": {"lastUpdated": instant(row["updated_at"])},
        "extension": extensions,
        "identifier": [{"system": ALERT_SYSTEM, "value": alert_id}],
        "status": "inactive" if resolved else "active",
        "category": [
            {"coding": [{"system": FLAG_CATEGORY_SYSTEM, "code": "drug", "display": "Drug"}]}
        ],
        "code": code,
        "subject": subject,
        "period": period,
        "author": _reference("Device", serial),
    }


FLAG_EXAMPLE: dict[str, Any] = {
    "resourceType": "Flag",
    "id": EXAMPLE_ALERT,
    "meta": {"lastUpdated": "2026-11-20T08:31:00Z"},
    "extension": [
        {"url": PRIORITY_EXTENSION, "valueCode": "medium"},
        {"url": ALERT_STATUS_EXTENSION, "valueCode": "open"},
        {"url": DETAIL_EXTENSION, "valueString": "The reservoir reaches its low alarm in 6 days."},
    ],
    "identifier": [{"system": ALERT_SYSTEM, "value": EXAMPLE_ALERT}],
    "status": "active",
    "category": [{"coding": [{"system": FLAG_CATEGORY_SYSTEM, "code": "drug", "display": "Drug"}]}],
    "code": {
        "coding": [{"system": RULE_SYSTEM, "code": "refill_due"}],
        "text": "Refill due in 6 days",
    },
    "subject": {"reference": f"Patient/{EXAMPLE_PATIENT}"},
    "period": {"start": "2026-11-20T08:31:00Z"},
    "author": {"reference": f"Device/{EXAMPLE_SERIAL}"},
}


def searchset(
    request: Request,
    entries: list[dict[str, Any]],
    next_cursor: str | None,
    *,
    total: int | None = None,
) -> dict[str, Any]:
    links = [{"relation": "self", "url": str(request.url)}]
    if next_cursor is not None:
        following = request.url.remove_query_params("_cursor").include_query_params(
            _cursor=next_cursor
        )
        links.append({"relation": "next", "url": str(following)})
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "timestamp": instant(datetime.now(UTC)),
    }
    if total is not None:
        bundle["total"] = total  # every match, not this page's
    bundle["link"] = links
    if entries:  # FHIR JSON has no empty arrays
        bundle["entry"] = entries
    return bundle


def search_entry(resource: dict[str, Any], full_url: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"resource": resource, "search": {"mode": "match"}}
    if full_url is not None:
        entry = {"fullUrl": full_url, **entry}
    return entry


def searchset_example(resource: dict[str, Any], self_url: str, full_url: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"resource": resource, "search": {"mode": "match"}}
    if full_url:
        entry = {"fullUrl": f"{EXAMPLE_BASE}/{resource['resourceType']}/{resource['id']}", **entry}
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "timestamp": "2026-11-20T09:00:00Z",
        "link": [
            {"relation": "self", "url": self_url},
            {
                "relation": "next",
                "url": f"{self_url}&_cursor=WyIyMDI2LTExLTIwVDA4OjMwOjAwKzAwOjAwIl0",
            },
        ],
        "entry": [entry],
    }
