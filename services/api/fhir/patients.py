"""FHIR R4 ``Patient`` (read, and search by ``identifier`` = MRN and ``name``) and the server's
``CapabilityStatement`` at ``/fhir/metadata``: what a FHIR client asks first, and what it is told
this server serves (nothing more)."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Path, Query, Request

from services.api import sql, sql_fhir
from services.api.auth import Principal
from services.api.common import Auth, Db, cursor_uuid, decode_cursor, encode_cursor, scope_of
from services.api.fhir import resources as fhir
from services.api.fhir.errors import ERRORS
from services.api.fhir.resources import EXAMPLE_BASE, EXAMPLE_PATIENT, FhirResponse, ok
from services.api.fhir.routes import FhirRoute, base_url
from services.api.fhir.search import DEFAULT_COUNT, Count, PageCursor
from services.api.problems import Problem, not_found

router = APIRouter(prefix="/fhir", tags=["fhir"], route_class=FhirRoute)

MRN_SYSTEM = "urn:pumpwatch:mrn:"
"""An MRN's identifier system: this prefix and the clinic's id (MRNs are unique per clinic)."""
IDENTIFIER_TYPES = "http://terminology.hl7.org/CodeSystem/v2-0203"
_MR = "Medical record number"
_EXAMPLE_CLINIC = "2c9d1e7a-4b3f-4e8a-9d6c-5f1a0b2c3d4e"


def patient(row: asyncpg.Record) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "id": str(row["id"]),
        "identifier": [
            {
                "use": "usual",
                "type": {
                    "coding": [
                        {
                            "system": IDENTIFIER_TYPES,
                            "code": "MR",
                            "display": "Medical record number",
                        }
                    ]
                },
                "system": f"{MRN_SYSTEM}{row['clinic_id']}",
                "value": row["mrn"],
            }
        ],
        "active": True,
    }
    if row["display_name"].strip():  # FHIR strings are never blank
        resource["name"] = [{"text": row["display_name"]}]
    if row["birth_date"] is not None:
        resource["birthDate"] = row["birth_date"].isoformat()
    return resource


PATIENT_EXAMPLE: dict[str, Any] = {
    "resourceType": "Patient",
    "id": EXAMPLE_PATIENT,
    "identifier": [
        {
            "use": "usual",
            "type": {"coding": [{"system": IDENTIFIER_TYPES, "code": "MR", "display": _MR}]},
            "system": f"{MRN_SYSTEM}{_EXAMPLE_CLINIC}",
            "value": "MRN-0042",
        }
    ],
    "active": True,
    "name": [{"text": "Ada Example"}],
    "birthDate": "1961-07-13",
}

_NO_FLEET = "the fleet role sees no patients"


def _identified(principal: Principal) -> None:
    if not principal.identified:
        raise Problem(403, _NO_FLEET, kind="forbidden")


@router.get(
    "/Patient/{patient_id}",
    summary="A patient as a FHIR Patient",
    description=(
        "The patient as a FHIR R4 `Patient`: `identifier` is the MRN (type `MR`, system "
        f"`{MRN_SYSTEM}{{clinic_id}}`: MRNs are unique within a clinic), `name.text` the "
        "display name, `birthDate` when recorded. Not for the fleet role (403). A patient of "
        "another clinic answers 404, exactly as one that does not exist."
    ),
    response_class=FhirResponse,
    responses={200: ok("Patient", PATIENT_EXAMPLE, "The patient as a FHIR Patient"), **ERRORS},
)
async def read_patient(
    patient_id: Annotated[
        UUID, Path(description="The patient's id (the Patient's id)", examples=[EXAMPLE_PATIENT])
    ],
    principal: Auth,
    db: Db,
) -> FhirResponse:
    _identified(principal)
    row = await db.fetchrow(sql.PATIENT, patient_id)
    if row is None or not principal.sees(row["clinic_id"]):
        raise not_found("patient")
    return FhirResponse(patient(row))


def _identifier(token: str | None) -> tuple[str | None, UUID | None, bool]:
    """The MRN and clinic an ``identifier`` token names: ``value``, ``system|value`` or
    ``|value``; and False when it can match nothing here (another system, no system)."""
    if token is None:
        return None, None, True
    system, bar, value = token.rpartition("|")
    if not bar:
        return value, None, True
    if not system.startswith(MRN_SYSTEM):
        return value, None, False
    try:
        return value, UUID(system.removeprefix(MRN_SYSTEM)), True
    except ValueError:
        return value, None, False


@router.get(
    "/Patient",
    summary="Patients as FHIR Patients (searchset Bundle), by MRN or name",
    description=(
        "The key's clinic's patients (admin keys: every clinic's) by name. Search parameters: "
        f"`identifier` (the MRN: `value`, or `{MRN_SYSTEM}{{clinic_id}}|value`), `name` "
        "(case-insensitive: the name or a word of it starts with the text given); both apply "
        "when both are given. `Bundle.total` counts every match. Results are `_count` per page "
        "(1-500, default 50); follow the `link` with relation `next` for the next. Not for the "
        "fleet role (403). Unknown parameters are ignored."
    ),
    response_class=FhirResponse,
    responses={
        200: ok(
            "Bundle",
            fhir.searchset_example(
                PATIENT_EXAMPLE,
                f"{EXAMPLE_BASE}/Patient?identifier=MRN-0042&_count=1",
                full_url=True,
            ),
            "A searchset Bundle of Patients, by name",
        ),
        **ERRORS,
    },
)
async def search_patients(
    request: Request,
    principal: Auth,
    db: Db,
    identifier: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=300,
            pattern=r"^[^\x00]*$",
            description="The MRN, optionally as `system|value`.",
            examples=["MRN-0042"],
        ),
    ] = None,
    name: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=200,
            pattern=r"^[^\x00]*$",
            description="The start of the name or of a word of it.",
            examples=["ada"],
        ),
    ] = None,
    count: Count = DEFAULT_COUNT,
    cursor: PageCursor = None,
) -> FhirResponse:
    _identified(principal)
    mrn, clinic, possible = _identifier(identifier)
    if not possible:
        return FhirResponse(fhir.searchset(request, [], None, total=0))
    after = decode_cursor(cursor, 2)
    scope = scope_of(principal)
    filters = (scope, mrn, clinic, name)
    total = await db.fetchval(sql_fhir.FHIR_PATIENTS_TOTAL, *filters)
    rows = await db.fetch(
        sql_fhir.FHIR_PATIENTS,
        *filters,
        None if after is None else after[0],
        None if after is None else cursor_uuid(after[1]),
        count + 1,
    )
    base = base_url(request)
    entries = [fhir.search_entry(patient(r), f"{base}/Patient/{r['id']}") for r in rows[:count]]
    next_cursor = None
    if len(rows) > count:
        last = rows[count - 1]
        next_cursor = encode_cursor(last["display_name"], last["id"])
    return FhirResponse(fhir.searchset(request, entries, next_cursor, total=total))


# --- the CapabilityStatement ---------------------------------------------------------------------

FHIR_VERSION = "4.0.1"
RELEASED = "2026-12-07"
"""When this CapabilityStatement's content last changed (its ``date``)."""


def _param(name: str, kind: str, documentation: str) -> dict[str, str]:
    return {"name": name, "type": kind, "documentation": documentation}


def _resource(
    kind: str, *, search: list[dict[str, str]] | None = None, profile: str | None = None
) -> dict[str, Any]:
    found: dict[str, Any] = {"type": kind}
    if profile:
        found["profile"] = profile
    interactions = [{"code": "read"}] + ([{"code": "search-type"}] if search else [])
    found["interaction"] = interactions
    if search:
        found["searchParam"] = search
    return found


def capability_statement(base: str, version: str) -> dict[str, Any]:
    """What this server serves, and nothing else: reads of four resource types, searches with
    the parameters their routes implement, JSON only, bearer API keys."""
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": RELEASED,
        "publisher": "pumpwatch",
        "kind": "instance",
        "software": {"name": "pumpwatch", "version": version},
        "implementation": {
            "description": "pumpwatch: implanted intrathecal drug pump telemetry",
            "url": base,
        },
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": "Read-only. Paging: `_count` (1-500) and the `next` link.",
                "security": {
                    "cors": False,
                    "description": "An API key in `Authorization: Bearer <key>` (roles admin, "
                    "clinician, integrator: one clinic; fleet: de-identified, no Patient). A "
                    "resource of another clinic answers 404.",
                },
                "resource": [
                    _resource("Device"),
                    _resource(
                        "Flag",
                        search=[
                            _param("patient", "reference", "`{id}` or `Patient/{id}`"),
                            _param("device", "reference", "`{serial}` or `Device/{serial}`"),
                        ],
                    ),
                    _resource(
                        "Observation",
                        search=[
                            _param("device", "reference", "required: the pump"),
                            _param("date", "date", "effectiveDateTime; repeatable, all apply"),
                            _param(
                                "code",
                                "token",
                                "the measure (pumpwatch's or MDC's code) or `pump-reading`, the "
                                "readings' panels (found by this code only); `code` or "
                                "`system|code`",
                            ),
                        ],
                    ),
                    _resource(
                        "Patient",
                        search=[
                            _param("identifier", "token", "the MRN"),
                            _param("name", "string", "the start of the name or of a word"),
                        ],
                    ),
                ],
            }
        ],
    }


@router.get(
    "/metadata",
    summary="The FHIR server's CapabilityStatement (no key needed)",
    description=(
        f"FHIR R4 (`fhirVersion` {FHIR_VERSION}) `CapabilityStatement`: the resource types "
        "this server reads and searches, with their search parameters, and how to "
        "authenticate. It carries no patient data: it answers without a key, so that FHIR "
        "clients can discover the server before they authenticate."
    ),
    response_class=FhirResponse,
    responses={
        200: ok(
            "CapabilityStatement",
            capability_statement(EXAMPLE_BASE, "1"),
            "What this server serves",
        )
    },
)
async def metadata(request: Request) -> FhirResponse:
    return FhirResponse(capability_statement(base_url(request), str(request.app.version)))
