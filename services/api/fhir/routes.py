"""FHIR R4 read endpoints for integrators: ``Device`` (a pump), ``Observation`` (its readings:
reservoir volume, programmed rate and dose, battery, in UCUM units; each reading also as a panel
of these) and ``Flag`` (its unresolved alerts), as ``application/fhir+json``.

Tenancy is the API's: the same keys, the same 404 for another clinic's pump, alert or patient,
and no patient references for the fleet role. Errors are FHIR ``OperationOutcome`` resources with
the status the rest of the API would answer (400 bad cursor, 401, 403, 404, 422 validation, 429);
their ``issue.details.coding`` carries the API's problem type. Only failures outside these routes'
handling (413 from the body limit, 500) stay RFC 9457 problem documents.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from services.api import sql, sql_fhir
from services.api.auth import Principal
from services.api.common import (
    Auth,
    Db,
    cursor_time,
    cursor_uuid,
    decode_cursor,
    encode_cursor,
    scope_of,
    visible,
)
from services.api.fhir.errors import ERRORS, outcome
from services.api.fhir.resources import (
    ALERT_STATUS_EXTENSION,
    ALERT_SYSTEM,
    CATEGORY_SYSTEM,
    DETAIL_EXTENSION,
    DEVICE_EXAMPLE,
    EXAMPLE_ALERT,
    EXAMPLE_BASE,
    EXAMPLE_PATIENT,
    EXAMPLE_SERIAL,
    FLAG_CATEGORY_SYSTEM,
    FLAG_EXAMPLE,
    MDC,
    MEASURES,
    OBSERVATION_EXAMPLE,
    OBSERVATION_ID,
    OBSERVATION_SYSTEM,
    PANEL_CODE,
    PANEL_EXAMPLE,
    PANEL_SYSTEM,
    PRIORITY_EXTENSION,
    RULE_SYSTEM,
    SERIAL_SYSTEM,
    UCUM,
    FhirResponse,
    device,
    flag,
    observation,
    ok,
    panel,
    parse_observation_id,
    search_entry,
    searchset,
    searchset_example,
)
from services.api.fhir.search import (
    DEFAULT_COUNT,
    DEVICE_REFERENCE,
    PANEL_SLOT,
    PATIENT_REFERENCE,
    CodeSearch,
    Count,
    DateSearch,
    PageCursor,
    cursor_slot,
    date_bounds,
    device_serial,
    slot_cursor,
    wanted_observations,
)
from services.api.problems import Problem, not_found, validation_problem
from services.api.routes.pumps import Serial, pump_clinic


class FhirRoute(APIRoute):
    """Answers this router's errors (auth, tenancy, validation) as OperationOutcomes."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Problem as exc:
                return outcome(exc)
            except RequestValidationError as exc:
                return outcome(validation_problem(exc))

        return route


router = APIRouter(prefix="/fhir", tags=["fhir"], route_class=FhirRoute)


_TENANCY = (
    "A pump, alert or patient of another clinic answers 404, exactly as one that does not exist. "
    "Errors are FHIR `OperationOutcome` resources with the API's usual status codes."
)
_PAGING = (
    "Results are newest first, `_count` per page (1-500, default 50); follow the Bundle's "
    "`link` with relation `next` (an opaque `_cursor`) for the next page. `Bundle.total` "
    "counts every match."
)


def base_url(request: Request) -> str:
    return f"{str(request.base_url).rstrip('/')}{router.prefix}"


# --- routes --------------------------------------------------------------------------------------


@router.get(
    "/Device/{serial}",
    summary="A pump as a FHIR Device",
    description=(
        "The pump with this serial number as a FHIR R4 `Device`: `id` and `serialNumber` are the "
        f"serial, also as an `identifier` of system `{SERIAL_SYSTEM}`; `deviceName` (type "
        "`model-name`) and `modelNumber` are the model the pump reports (else the registered "
        "one); `status` is `active`. `patient` references `Patient/{patient_id}` when the pump is "
        "assigned, except for the fleet role, which never sees patient references.\n\n" + _TENANCY
    ),
    response_class=FhirResponse,
    responses={200: ok("Device", DEVICE_EXAMPLE, "The pump as a FHIR Device"), **ERRORS},
)
async def read_device(serial: Serial, principal: Auth, db: Db) -> FhirResponse:
    await pump_clinic(db, principal, serial)
    row = await db.fetchrow(sql.PUMP, serial)
    if row is None:
        raise not_found("pump")
    return FhirResponse(device(row, principal))


@router.get(
    "/Observation",
    summary="A pump's readings as FHIR Observations (searchset Bundle)",
    description=(
        "One `Observation` per reading and measure, `status` `final`, `effectiveDateTime` the "
        "reading's time, `issued` when it arrived, `subject` the patient the pump was assigned "
        "to then (`Patient/{id}`; the pump, `Device/{serial}`, for the fleet role or when it was "
        f"nobody's), `device` the pump, `category` `device` (system `{CATEGORY_SYSTEM}`). "
        f"`code` is of the system `{OBSERVATION_SYSTEM}`, followed by the ISO/IEEE 11073-10101 "
        f"code (system `{MDC}`) where that nomenclature has one (LOINC has none for pump "
        f"telemetry); `valueQuantity` is in UCUM (`system` `{UCUM}`):\n\n"
        "| code | value | UCUM | MDC |\n|---|---|---|---|\n"
        "| `reservoir-volume` | drug in the reservoir | `mL` | none |\n"
        "| `programmed-rate` | programmed infusion rate | `mL/d` | `157784` "
        "MDC_FLOW_FLUID_PUMP |\n"
        "| `programmed-dose` | programmed daily dose | `ug/d` | `157924` MDC_RATE_DOSE |\n"
        "| `battery-remaining` | battery charge (when the pump reports it) | `%` | `67996` "
        "MDC_ATTR_VAL_BATT_CHARGE |\n\n"
        "Each reading is also a panel Observation (FHIR's grouping): code "
        f"`{PANEL_CODE}` (system `{PANEL_SYSTEM}`), no value, its measures' Observations as "
        "`hasMember`, the same subject, device and times. Panels are found by their code only "
        f"(`code={PANEL_CODE}`, alone or with measures: `code={PANEL_CODE},reservoir-volume`); "
        "without `code`, a search finds the measures. Within a reading the panel comes first.\n\n"
        "Observation ids are `{serial}.{time}.{reading}.{measure}`, a panel's "
        "`{serial}.{time}.{reading}` (see `GET /fhir/Observation/{observation_id}`). Search "
        "parameters: `device` (required: `{serial}` or `Device/{serial}`), `date` (repeatable, "
        "all apply: prefixes `eq` (default), `ge`, `gt`, `le`, `lt`, `sa`, `eb`; a year, month or "
        "day (UTC) or a date-time with an offset; `date=ge2026-11-01&date=lt2026-12-01` is "
        "November), `code` (`code`, `system|code` or `system|`, of either of our systems or "
        "MDC's; a comma means or). Unknown parameters are ignored.\n\n"
        + _PAGING
        + "\n\n"
        + _TENANCY
    ),
    response_class=FhirResponse,
    responses={
        200: ok(
            "Bundle",
            searchset_example(
                OBSERVATION_EXAMPLE,
                f"{EXAMPLE_BASE}/Observation?device={EXAMPLE_SERIAL}&_count=1",
                full_url=True,
            ),
            "A searchset Bundle of Observations, newest first",
        ),
        **ERRORS,
    },
)
async def search_observations(
    request: Request,
    principal: Auth,
    db: Db,
    device_param: Annotated[
        str,
        Query(
            alias="device",
            pattern=DEVICE_REFERENCE,
            description="The pump: `{serial}` or `Device/{serial}`.",
            examples=[EXAMPLE_SERIAL],
        ),
    ],
    date_param: Annotated[
        list[DateSearch] | None,
        Query(
            alias="date",
            description="`effectiveDateTime` bounds (repeatable; all apply), e.g. "
            "`ge2026-11-01T00:00:00Z`.",
            examples=[["ge2026-11-01", "lt2026-12-01"]],
        ),
    ] = None,
    code_param: Annotated[
        list[CodeSearch] | None,
        Query(
            alias="code",
            description="Measures: `reservoir-volume`, `programmed-rate`, `programmed-dose`, "
            f"`battery-remaining` (or their MDC codes); the readings' panels: `{PANEL_CODE}`; "
            "optionally as `system|code`; a comma means or.",
            examples=[["reservoir-volume,battery-remaining"]],
        ),
    ] = None,
    count: Count = DEFAULT_COUNT,
    cursor: PageCursor = None,
) -> FhirResponse:
    serial = device_serial(device_param)
    await pump_clinic(db, principal, serial, history=True)
    low, high = date_bounds(date_param or ())
    wanted, panels = wanted_observations(code_param or ())
    after = decode_cursor(cursor, 3)
    at = None if after is None else cursor_time(after[0])
    msg_id = None if after is None else cursor_uuid(after[1])
    start_slot = PANEL_SLOT if after is None else cursor_slot(after[2])
    if not (wanted or panels) or low >= high:
        return FhirResponse(searchset(request, [], None, total=0))
    codes = {m.code for m in wanted}
    # A panel is one per reading, so it counts as the volume does ($4 counts each reading 0-2 x).
    total = await db.fetchval(
        sql_fhir.FHIR_OBSERVATIONS_TOTAL,
        serial,
        low,
        high,
        int("reservoir-volume" in codes) + int(panels),
        "programmed-rate" in codes,
        "programmed-dose" in codes,
        "battery-remaining" in codes,
        scope_of(principal),
    )
    patient_at = await patients_at(db, principal, serial)
    base = base_url(request)
    rows = await db.fetch(
        sql_fhir.FHIR_READINGS,
        serial,
        low,
        high,
        at,
        msg_id,
        panels or bool(codes & {"reservoir-volume", "programmed-rate"}),
        "programmed-dose" in codes,
        "battery-remaining" in codes,
        count + 2,  # every row has an Observation wanted; the cursor's may have none left
        scope_of(principal),
    )
    slots = ([PANEL_SLOT] if panels else []) + [
        index for index, measure in enumerate(MEASURES) if measure in wanted
    ]
    entries: list[dict[str, Any]] = []
    next_cursor = None
    for row in rows:
        resumed = row["recorded_at"] == at and row["msg_id"] == msg_id
        for slot in slots:
            if slot != PANEL_SLOT and row[MEASURES[slot].column] is None:
                continue
            if resumed and slot < start_slot:
                continue
            if len(entries) == count:
                next_cursor = encode_cursor(
                    row["recorded_at"].isoformat(), row["msg_id"], slot_cursor(slot)
                )
                break
            subject = patient_at(row["recorded_at"])
            resource = (
                panel(row, serial, subject)
                if slot == PANEL_SLOT
                else observation(row, MEASURES[slot], serial, subject)
            )
            entries.append(search_entry(resource, f"{base}/Observation/{resource['id']}"))
        if next_cursor is not None:
            break
    return FhirResponse(searchset(request, entries, next_cursor, total=total))


async def patients_at(
    db: Db, principal: Principal, serial: str
) -> Callable[[datetime], UUID | None]:
    """Who the pump was assigned to at a time (None: nobody; always None for the fleet)."""
    if not principal.identified:
        return lambda _: None
    periods = await db.fetch(sql_fhir.PUMP_PERIODS, serial)

    def at(when: datetime) -> UUID | None:
        for period in periods:
            since, until = period["since"], period["until"]
            if (since is None or since <= when) and (until is None or when < until):
                found: UUID | None = period["patient_id"]
                return found
        return None

    return at


@router.get(
    "/Observation/{observation_id}",
    summary="One measure of a reading, or the reading's panel, as a FHIR Observation",
    description=(
        "The Observation with this id, as `GET /fhir/Observation` finds it: ids are "
        "`{serial}.{time}.{reading}.{measure}` (the reading's time in microseconds since 1970 "
        "in base 36, the first 8 hex digits of its id, the measure's letter: `v` volume, `r` "
        "rate, `d` dose, `b` battery); `identifier` (system `urn:pumpwatch:reading`) is "
        "`{reading id}-{code}`. Without the measure's letter, `{serial}.{time}.{reading}` is the "
        f"reading's panel (code `{PANEL_CODE}`, its measures as `hasMember`, `identifier` the "
        "reading id), for example:\n\n```json\n"
        + json.dumps(PANEL_EXAMPLE, indent=1)
        + "\n```\n\n`subject` is the patient the pump was assigned to when the "
        "reading was taken (the pump itself for the fleet role or when it was nobody's), "
        "`device` the pump. A clinic reads the readings of the periods in which it held the "
        "pump.\n\n" + _TENANCY
    ),
    response_class=FhirResponse,
    responses={
        200: ok(
            "Observation",
            OBSERVATION_EXAMPLE,
            "The reading's measure (or the reading's panel) as an Observation",
        ),
        **ERRORS,
    },
)
async def read_observation(
    observation_id: Annotated[
        str,
        Path(
            pattern=rf"^{OBSERVATION_ID.pattern}$",
            description="The Observation's id",
            examples=[OBSERVATION_EXAMPLE["id"]],
        ),
    ],
    principal: Auth,
    db: Db,
) -> FhirResponse:
    parsed = parse_observation_id(observation_id)
    if parsed is None:
        raise not_found("observation")
    serial, at, reading, measure = parsed
    await pump_clinic(db, principal, serial, history=True)
    row = await db.fetchrow(sql_fhir.FHIR_READING, serial, at, reading, scope_of(principal))
    if row is None or (measure is not None and row[measure.column] is None):
        raise not_found("observation")
    patient_at = await patients_at(db, principal, serial)
    subject = patient_at(row["recorded_at"])
    if measure is None:
        return FhirResponse(panel(row, serial, subject))
    return FhirResponse(observation(row, measure, serial, subject))


@router.get(
    "/Flag/{alert_id}",
    summary="An alert as a FHIR Flag",
    description=(
        "The alert as a FHIR R4 `Flag`: `status` `active` until it is resolved, then "
        "`inactive` with `period.end`; `period.start` is when it opened; `code.text` is its "
        f"title and `code.coding` its rule (system `{RULE_SYSTEM}`: `refill_due`, "
        "`reservoir_low`, `battery_eos`, … the API's stable rule codes); `category` is `drug` "
        f"({FLAG_CATEGORY_SYSTEM}). Extensions carry the priority "
        f"(`{PRIORITY_EXTENSION}`: `high`, `medium`, `low`), the alert's own status "
        f"(`{ALERT_STATUS_EXTENSION}`: `open`, `acknowledged`, `resolved`) and its detail text "
        f"(`{DETAIL_EXTENSION}`); `identifier` (system `{ALERT_SYSTEM}`) is the alert id. "
        "`subject` is the patient (`Patient/{patient_id}`), or the pump (`Device/{serial}`) for "
        "the fleet role and for pumps without a patient; `author` is always the pump.\n\n"
        + _TENANCY
    ),
    response_class=FhirResponse,
    responses={200: ok("Flag", FLAG_EXAMPLE, "The alert as a FHIR Flag"), **ERRORS},
)
async def read_flag(
    alert_id: Annotated[
        UUID, Path(description="The alert's id (the Flag's id)", examples=[EXAMPLE_ALERT])
    ],
    principal: Auth,
    db: Db,
) -> FhirResponse:
    row = await db.fetchrow(sql.ALERT, alert_id)
    if row is None:
        raise not_found("alert")
    visible(principal, row["clinic_id"], "alert")
    return FhirResponse(flag(row, principal))


@router.get(
    "/Flag",
    summary="Unresolved alerts as FHIR Flags (searchset Bundle)",
    description=(
        "The alerts not yet resolved (open or acknowledged), newest first, as `Flag` resources "
        "(see `GET /fhir/Flag/{alert_id}` for their content). Search parameters: `patient` "
        "(`{id}` or `Patient/{id}`; not for the fleet role) and `device` (`{serial}` or "
        "`Device/{serial}`); both apply when both are given; without either, every unresolved "
        "alert the key may see. Unknown parameters are ignored.\n\n" + _PAGING + "\n\n" + _TENANCY
    ),
    response_class=FhirResponse,
    responses={
        200: ok(
            "Bundle",
            searchset_example(
                FLAG_EXAMPLE,
                f"{EXAMPLE_BASE}/Flag?patient={EXAMPLE_PATIENT}&_count=1",
                full_url=True,
            ),
            "A searchset Bundle of Flags, newest first",
        ),
        **ERRORS,
    },
)
async def search_flags(
    request: Request,
    principal: Auth,
    db: Db,
    patient: Annotated[
        str | None,
        Query(
            pattern=PATIENT_REFERENCE,
            description="The patient: `{id}` or `Patient/{id}`.",
            examples=[EXAMPLE_PATIENT],
        ),
    ] = None,
    device_param: Annotated[
        str | None,
        Query(
            alias="device",
            pattern=DEVICE_REFERENCE,
            description="The pump: `{serial}` or `Device/{serial}`.",
            examples=[EXAMPLE_SERIAL],
        ),
    ] = None,
    count: Count = DEFAULT_COUNT,
    cursor: PageCursor = None,
) -> FhirResponse:
    patient_id = None
    if patient is not None:
        if principal.role == "fleet":
            raise Problem(403, "the fleet role cannot search by patient", kind="forbidden")
        patient_id = UUID(patient.removeprefix("Patient/"))
        found = await db.fetchrow(sql.PATIENT, patient_id)
        if found is None:
            raise not_found("patient")
        visible(principal, found["clinic_id"], "patient")
    serial = None
    if device_param is not None:
        serial = device_serial(device_param)
        await pump_clinic(db, principal, serial)
    after = decode_cursor(cursor, 2)
    rows = await db.fetch(
        sql_fhir.FHIR_UNRESOLVED_ALERTS,
        scope_of(principal),
        serial,
        patient_id,
        None if after is None else cursor_time(after[0]),
        None if after is None else cursor_uuid(after[1]),
        count + 1,
    )
    total = await db.fetchval(
        sql_fhir.FHIR_UNRESOLVED_ALERTS_TOTAL, scope_of(principal), serial, patient_id
    )
    base = base_url(request)
    entries = [search_entry(flag(r, principal), f"{base}/Flag/{r['id']}") for r in rows[:count]]
    next_cursor = None
    if len(rows) > count:
        last = rows[count - 1]
        next_cursor = encode_cursor(last["opened_at"].isoformat(), last["id"])
    return FhirResponse(searchset(request, entries, next_cursor, total=total))
