"""FHIR R4 read endpoints for integrators: ``Device`` (a pump), ``Observation`` (its readings:
reservoir volume, programmed rate and dose, battery, in UCUM units) and ``Flag`` (its unresolved
alerts), as ``application/fhir+json``.

Tenancy is the API's: the same keys, the same 404 for another clinic's pump, alert or patient,
and no patient references for the fleet role. Errors are FHIR ``OperationOutcome`` resources with
the status the rest of the API would answer (400 bad cursor, 401, 403, 404, 422 validation, 429);
their ``issue.details.coding`` carries the API's problem type. Only failures outside these routes'
handling (413 from the body limit, 500) stay RFC 9457 problem documents.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, StringConstraints

from services.api import sql
from services.api.auth import Principal
from services.api.common import (
    Auth,
    Db,
    cursor_uuid,
    decode_cursor,
    encode_cursor,
    scope_of,
    visible,
)
from services.api.problems import MEDIA_TYPE as PROBLEM_JSON
from services.api.problems import FieldError, Problem, not_found, validation_problem
from services.api.routes.pumps import Serial, _cursor_time, pump_clinic

FHIR_JSON = "application/fhir+json"

SERIAL_SYSTEM = "urn:pumpwatch:serial"
ALERT_SYSTEM = "urn:pumpwatch:alert"
OBSERVATION_SYSTEM = "https://pumpwatch.dev/fhir/CodeSystem/pump-observation"
CATEGORY_SYSTEM = "https://pumpwatch.dev/fhir/CodeSystem/observation-category"
RULE_SYSTEM = "https://pumpwatch.dev/fhir/CodeSystem/alert-rule"
PRIORITY_EXTENSION = "https://pumpwatch.dev/fhir/StructureDefinition/alert-priority"
ALERT_STATUS_EXTENSION = "https://pumpwatch.dev/fhir/StructureDefinition/alert-status"
DETAIL_EXTENSION = "https://pumpwatch.dev/fhir/StructureDefinition/alert-detail"
FLAG_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/flag-category"
UCUM = "http://unitsofmeasure.org"
PROBLEM_SYSTEM = "https://pumpwatch.dev/problems"

DEFAULT_COUNT = 50
MAX_COUNT = 500


@dataclass(frozen=True, slots=True)
class Measure:
    """One Observation code: which reading column it reports, in which UCUM unit."""

    code: str
    display: str
    column: str
    unit: str
    """Human-readable unit (``Quantity.unit``)."""
    ucum: str
    """UCUM code (``Quantity.code``)."""


MEASURES: tuple[Measure, ...] = (
    Measure("reservoir-volume", "Reservoir volume", "volume_ml", "mL", "mL"),
    Measure("programmed-rate", "Programmed infusion rate", "rate_ml_per_day", "mL/d", "mL/d"),
    Measure("programmed-dose", "Programmed daily dose", "daily_dose_mcg", "µg/d", "ug/d"),
    Measure("battery-remaining", "Battery remaining", "battery_pct", "%", "%"),
)


# --- responses and errors ------------------------------------------------------------------------


class FhirResponse(JSONResponse):
    media_type = FHIR_JSON


_PROBLEM = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemDocument"}}}
_TOO_LARGE: dict[str, Any] = {
    "description": "Request body too large (an RFC 9457 problem document)",
    "content": _PROBLEM,
}

_ISSUE_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    409: "conflict",
    413: "too-long",
    422: "invalid",
    429: "throttled",
}


def _issue(problem: Problem, error: FieldError | None = None) -> dict[str, Any]:
    issue: dict[str, Any] = {
        "severity": "error",
        "code": _ISSUE_CODES.get(problem.status, "exception"),
        "details": {
            "coding": [{"system": PROBLEM_SYSTEM, "code": problem.kind, "display": problem.title}],
            "text": problem.detail if error is None else f"{error.field}: {error.message}",
        },
    }
    if error is not None:
        issue["diagnostics"] = error.field
    return issue


def outcome(problem: Problem) -> FhirResponse:
    """The OperationOutcome of a problem: same status and headers, one issue per field error."""
    issues = [_issue(problem, error) for error in problem.errors or ()]
    body = {"resourceType": "OperationOutcome", "issue": issues or [_issue(problem)]}
    return FhirResponse(body, status_code=problem.status, headers=problem.headers)


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


# --- OpenAPI: schemas and examples for integrators -----------------------------------------------


class _Coding(BaseModel):
    system: str
    code: str
    display: str | None = None


class _Details(BaseModel):
    coding: list[_Coding]
    text: str


class _Issue(BaseModel):
    severity: Literal["fatal", "error", "warning", "information"]
    code: str = Field(description="FHIR IssueType: `not-found`, `invalid`, `login`, …")
    details: _Details = Field(description="The API's problem type (`coding`) and detail (`text`).")
    diagnostics: str | None = Field(
        default=None, description="The parameter a validation error is about (`query._count`)."
    )


class OperationOutcome(BaseModel):
    """A FHIR OperationOutcome: what the FHIR routes answer on an error."""

    resourceType: Literal["OperationOutcome"]
    issue: list[_Issue] = Field(min_length=1)


_EXAMPLE_SERIAL = "NGP204519H"
_EXAMPLE_PATIENT = "6f1c2f4e-8d7a-4a53-9a43-2b1f0c9e7d11"
_EXAMPLE_ALERT = "0b8e3c52-5f55-4c1e-9a7e-3f0d1c2b4a6e"
_EXAMPLE_READING = "3d9b7c0a-1e2f-4a5b-8c6d-7e8f9a0b1c2d"
_BASE = "https://pumpwatch.example.org/fhir"


def _resource_schema(resource_type: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": f"A FHIR R4 {resource_type} "
        f"(https://hl7.org/fhir/R4/{resource_type.lower()}.html), JSON format.",
        "required": ["resourceType"],
        "properties": {"resourceType": {"type": "string", "enum": [resource_type]}},
        "additionalProperties": True,
    }


_DEVICE_EXAMPLE: dict[str, Any] = {
    "resourceType": "Device",
    "id": _EXAMPLE_SERIAL,
    "identifier": [{"system": SERIAL_SYSTEM, "value": _EXAMPLE_SERIAL}],
    "status": "active",
    "serialNumber": _EXAMPLE_SERIAL,
    "deviceName": [{"name": "SynchroMed II 8637-40", "type": "model-name"}],
    "modelNumber": "SynchroMed II 8637-40",
    "patient": {"reference": f"Patient/{_EXAMPLE_PATIENT}"},
}

_OBSERVATION_EXAMPLE: dict[str, Any] = {
    "resourceType": "Observation",
    "id": f"{_EXAMPLE_READING}-reservoir-volume",
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
    "subject": {"reference": f"Device/{_EXAMPLE_SERIAL}"},
    "effectiveDateTime": "2026-11-20T08:30:00Z",
    "issued": "2026-11-20T08:30:02.113Z",
    "valueQuantity": {"value": 17.42, "unit": "mL", "system": UCUM, "code": "mL"},
    "device": {"reference": f"Device/{_EXAMPLE_SERIAL}"},
}

_FLAG_EXAMPLE: dict[str, Any] = {
    "resourceType": "Flag",
    "id": _EXAMPLE_ALERT,
    "meta": {"lastUpdated": "2026-11-20T08:31:00Z"},
    "extension": [
        {"url": PRIORITY_EXTENSION, "valueCode": "medium"},
        {"url": ALERT_STATUS_EXTENSION, "valueCode": "open"},
        {"url": DETAIL_EXTENSION, "valueString": "The reservoir reaches its low alarm in 6 days."},
    ],
    "identifier": [{"system": ALERT_SYSTEM, "value": _EXAMPLE_ALERT}],
    "status": "active",
    "category": [{"coding": [{"system": FLAG_CATEGORY_SYSTEM, "code": "drug", "display": "Drug"}]}],
    "code": {
        "coding": [{"system": RULE_SYSTEM, "code": "refill_due"}],
        "text": "Refill due in 6 days",
    },
    "subject": {"reference": f"Patient/{_EXAMPLE_PATIENT}"},
    "period": {"start": "2026-11-20T08:31:00Z"},
    "author": {"reference": f"Device/{_EXAMPLE_SERIAL}"},
}


def _searchset_example(resource: dict[str, Any], self_url: str, full_url: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"resource": resource, "search": {"mode": "match"}}
    if full_url:
        entry = {"fullUrl": f"{_BASE}/{resource['resourceType']}/{resource['id']}", **entry}
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


def _ok(resource_type: str, example: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {FHIR_JSON: {"schema": _resource_schema(resource_type), "example": example}},
    }


def _error(
    status: int, kind: str, title: str, detail: str, description: str, *, problem_too: bool = False
) -> dict[str, Any]:
    example = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": _ISSUE_CODES[status],
                "details": {
                    "coding": [{"system": PROBLEM_SYSTEM, "code": kind, "display": title}],
                    "text": detail,
                },
            }
        ],
    }
    content: dict[str, Any] = {FHIR_JSON: {"example": example}}
    if problem_too:
        content |= _PROBLEM
    return {"model": OperationOutcome, "description": description, "content": content}


# Every status the app documents for all routes, as these routes answer it (an OperationOutcome;
# the 413 of the body limit comes from outside them, as a problem document).
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error(
        400,
        "bad-cursor",
        "Bad Request",
        "cursor is not one this API gave out",
        "Malformed request: a `_cursor` this API did not give out",
    ),
    401: _error(
        401,
        "unauthenticated",
        "Unauthorized",
        "send an API key: Authorization: Bearer <key>",
        "No key, or an unknown or revoked one",
    ),
    403: _error(
        403,
        "forbidden",
        "Forbidden",
        "the fleet role cannot search by patient",
        "The key's role may not do this (the fleet role searching by patient)",
    ),
    404: _error(
        404,
        "not-found",
        "Not Found",
        "pump not found",
        "No such resource, or one of another clinic (a path that names no route at all, such "
        "as `/fhir/Device/` without a serial, is answered by the API as a problem document)",
        problem_too=True,
    ),
    409: _error(
        409,
        "conflict",
        "Conflict",
        "the resource changed meanwhile",
        "Conflicts with the current state (not answered by these read-only routes)",
    ),
    413: _TOO_LARGE,
    422: _error(
        422,
        "validation",
        "Request validation failed",
        "query._count: must be at most 500",
        "A parameter is malformed (`issue.diagnostics` names it)",
    ),
    429: _error(
        429,
        "rate-limited",
        "Too Many Requests",
        "too many failed authentications from this source; retry in 31 s",
        "Too many failed authentications from this source",
    ),
}

_TENANCY = (
    "A pump, alert or patient of another clinic answers 404, exactly as one that does not exist. "
    "Errors are FHIR `OperationOutcome` resources with the API's usual status codes."
)
_PAGING = (
    "Results are newest first, `_count` per page (1-500, default 50); follow the Bundle's "
    "`link` with relation `next` (an opaque `_cursor`) for the next page. There is no "
    "`Bundle.total`."
)


# --- search parameters ---------------------------------------------------------------------------

_SERIAL = r"[A-Za-z0-9-]{4,32}"
_UUID = r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
DEVICE_REFERENCE = rf"^(Device/)?{_SERIAL}$"
PATIENT_REFERENCE = rf"^(Patient/)?{_UUID}$"
# FHIR date search values with the prefixes served (not ne, ap): a year, a month, a day of the
# calendar (leap years included), or a date-time to the minute, second or fraction, which then
# needs a UTC offset. Whatever the pattern admits is served; nothing else is.
_YEAR = r"[1-9][0-9]{3}"
_LEAP_YEAR = r"([1-9][0-9](0[48]|[2468][048]|[13579][26])|(1[26]|[2468][048]|[3579][26])00)"
_MONTH = r"(0[1-9]|1[0-2])"
_DAY = rf"({_YEAR}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
_DAY += rf"|02-(0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)"
_TIME = r"(T([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,9})?)?"
_TIME += r"(Z|[+-](0[0-9]|1[0-3]):[0-5][0-9]|[+-]14:00))"
DATE_SEARCH = rf"^(eq|gt|lt|ge|le|sa|eb)?({_YEAR}(-{_MONTH})?|{_DAY}{_TIME}?)$"

DateSearch = Annotated[str, StringConstraints(pattern=DATE_SEARCH)]
CodeSearch = Annotated[str, StringConstraints(min_length=1, max_length=500)]

Count = Annotated[
    int,
    Query(
        alias="_count",
        title="_count",
        ge=1,
        le=MAX_COUNT,
        description=f"Resources per page (1-{MAX_COUNT}).",
        examples=[DEFAULT_COUNT],
    ),
]
PageCursor = Annotated[
    str | None,
    Query(
        alias="_cursor",
        title="_cursor",
        max_length=500,
        description="Opaque: taken from the `next` link of the previous page.",
    ),
]

_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)
_DATE = re.compile(DATE_SEARCH)
_DATE_PREFIX = re.compile(r"(eq|gt|lt|ge|le|sa|eb)?")
_CLOCK = re.compile(r"[0-9:.]+")


def _shift(at: datetime, by: timedelta) -> datetime:
    try:
        return at + by
    except OverflowError:
        return _LATEST


def _next_month(year: int, month: int) -> datetime:
    if year == 9999 and month == 12:
        return _LATEST
    return datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)


def _bad_date(why: str) -> Problem:
    return Problem(
        422,
        f"date: {why}",
        kind="validation",
        title="Request validation failed",
        errors=[FieldError(field="query.date", message=why)],
    )


def date_range(value: str) -> tuple[datetime, datetime]:
    """The instants [start, end) a FHIR date search value (without prefix, of the form
    ``DATE_SEARCH`` allows) stands for: the whole year, month, day (UTC), minute, second or
    fraction it names."""
    if len(value) == 4:
        year = int(value)
        return datetime(year, 1, 1, tzinfo=UTC), _next_month(year, 12)
    if len(value) == 7:
        year, month = int(value[:4]), int(value[5:])
        return datetime(year, month, 1, tzinfo=UTC), _next_month(year, month)
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return start, _shift(start, timedelta(days=1))
        given = datetime.fromisoformat(value)
    except ValueError as exc:
        raise _bad_date("not a calendar date") from exc
    clock = _CLOCK.match(value, 11)  # hh:mm[:ss[.fff]], the precision given
    digits = 0 if clock is None else len(clock.group())
    if digits <= 5:
        width = timedelta(minutes=1)
    elif digits == 8:
        width = timedelta(seconds=1)
    else:
        width = timedelta(microseconds=10 ** (6 - min(digits - 9, 6)))
    try:
        start = given.astimezone(UTC)
    except OverflowError:
        return _LATEST, _LATEST
    return start, _shift(start, width)


def date_bounds(values: Sequence[str]) -> tuple[datetime, datetime]:
    """``recorded_at`` from (inclusive) and until (exclusive) for the ``date`` parameters,
    which all apply (AND)."""
    low, high = _EARLIEST, _LATEST
    for value in values:
        if _DATE.fullmatch(value) is None:
            raise _bad_date("not a FHIR date search value this server serves")
        found = _DATE_PREFIX.match(value)
        assert found is not None  # the pattern matches any string
        prefix = found.group(1) or "eq"
        start, end = date_range(value[found.end() :])
        if prefix == "eq":
            low, high = max(low, start), min(high, end)
        elif prefix == "ge":
            low = max(low, start)
        elif prefix in ("gt", "sa"):
            low = max(low, end)
        elif prefix in ("lt", "eb"):
            high = min(high, start)
        else:  # le
            high = min(high, end)
    return low, high


def wanted_measures(params: Sequence[str]) -> tuple[Measure, ...]:
    """The measures the ``code`` parameters select: each a comma-separated list of tokens
    (``code``, ``system|code``, ``system|``) of which one must match; all parameters apply."""
    wanted = list(MEASURES)
    for param in params:
        chosen: set[str] = set()
        for token in param.split(","):
            system, bar, code = token.rpartition("|")
            if bar and system != OBSERVATION_SYSTEM:
                continue  # another system (or `|code`: none) has none of these codes
            if bar and code == "":
                chosen.update(m.code for m in MEASURES)  # `system|`: every code of ours
            else:
                chosen.add(code)
        wanted = [m for m in wanted if m.code in chosen]
    return tuple(wanted)


def _device_serial(reference: str) -> str:
    return reference.removeprefix("Device/")


# --- resources -----------------------------------------------------------------------------------


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


def observation(row: asyncpg.Record, measure: Measure, serial: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"{row['msg_id']}-{measure.code}",
        "status": "final",
        "category": [
            {
                "coding": [
                    {"system": CATEGORY_SYSTEM, "code": "device", "display": "Device telemetry"}
                ]
            }
        ],
        "code": {
            "coding": [
                {"system": OBSERVATION_SYSTEM, "code": measure.code, "display": measure.display}
            ],
            "text": measure.display,
        },
        "subject": _reference("Device", serial),
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


def _base(request: Request) -> str:
    return f"{str(request.base_url).rstrip('/')}{router.prefix}"


def searchset(
    request: Request, entries: list[dict[str, Any]], next_cursor: str | None
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
        "link": links,
    }
    if entries:  # FHIR JSON has no empty arrays
        bundle["entry"] = entries
    return bundle


def _entry(resource: dict[str, Any], full_url: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"resource": resource, "search": {"mode": "match"}}
    if full_url is not None:
        entry = {"fullUrl": full_url, **entry}
    return entry


def _cursor_index(value: str | None) -> int:
    if value is None or not value.isdigit() or int(value) >= len(MEASURES):
        raise Problem(400, "cursor is not one this API gave out", kind="bad-cursor")
    return int(value)


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
    responses={200: _ok("Device", _DEVICE_EXAMPLE, "The pump as a FHIR Device"), **_ERRORS},
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
        "reading's time, `issued` when it arrived, `subject` and `device` the pump "
        f"(`Device/{{serial}}`), `category` `device` (system `{CATEGORY_SYSTEM}`). LOINC has no "
        f"codes for pump telemetry, so `code` is of the system `{OBSERVATION_SYSTEM}`; "
        f"`valueQuantity` is in UCUM (`system` `{UCUM}`):\n\n"
        "| code | value | UCUM |\n|---|---|---|\n"
        "| `reservoir-volume` | drug in the reservoir | `mL` |\n"
        "| `programmed-rate` | programmed infusion rate | `mL/d` |\n"
        "| `programmed-dose` | programmed daily dose | `ug/d` |\n"
        "| `battery-remaining` | battery charge (when the pump reports it) | `%` |\n\n"
        "Observation ids are `{reading id}-{code}`. Search parameters: `device` (required: "
        "`{serial}` or `Device/{serial}`), `date` (repeatable, all apply: prefixes `eq` (default), "
        "`ge`, `gt`, `le`, `lt`, `sa`, `eb`; a year, month or day (UTC) or a date-time with an "
        "offset; `date=ge2026-11-01&date=lt2026-12-01` is November), `code` (`code`, "
        "`system|code` or `system|`; a comma means or). Unknown parameters are ignored.\n\n"
        + _PAGING
        + "\n\n"
        + _TENANCY
    ),
    response_class=FhirResponse,
    responses={
        200: _ok(
            "Bundle",
            _searchset_example(
                _OBSERVATION_EXAMPLE,
                f"{_BASE}/Observation?device={_EXAMPLE_SERIAL}&_count=1",
                full_url=False,
            ),
            "A searchset Bundle of Observations, newest first",
        ),
        **_ERRORS,
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
            examples=[_EXAMPLE_SERIAL],
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
            "`battery-remaining`, optionally as `system|code`; a comma means or.",
            examples=[["reservoir-volume,battery-remaining"]],
        ),
    ] = None,
    count: Count = DEFAULT_COUNT,
    cursor: PageCursor = None,
) -> FhirResponse:
    serial = _device_serial(device_param)
    await pump_clinic(db, principal, serial)
    low, high = date_bounds(date_param or ())
    wanted = wanted_measures(code_param or ())
    after = decode_cursor(cursor, 3)
    at = None if after is None else _cursor_time(after[0])
    msg_id = None if after is None else cursor_uuid(after[1])
    start_index = 0 if after is None else _cursor_index(after[2])
    if not wanted or low >= high:
        return FhirResponse(searchset(request, [], None))
    codes = {m.code for m in wanted}
    rows = await db.fetch(
        sql.FHIR_READINGS,
        serial,
        low,
        high,
        at,
        msg_id,
        bool(codes & {"reservoir-volume", "programmed-rate"}),
        "programmed-dose" in codes,
        "battery-remaining" in codes,
        count + 2,  # every row has an Observation wanted; the cursor's may have none left
    )
    entries: list[dict[str, Any]] = []
    next_cursor = None
    for row in rows:
        resumed = row["recorded_at"] == at and row["msg_id"] == msg_id
        for index, measure in enumerate(MEASURES):
            if measure not in wanted or row[measure.column] is None:
                continue
            if resumed and index < start_index:
                continue
            if len(entries) == count:
                next_cursor = encode_cursor(row["recorded_at"].isoformat(), row["msg_id"], index)
                break
            entries.append(_entry(observation(row, measure, serial), None))
        if next_cursor is not None:
            break
    return FhirResponse(searchset(request, entries, next_cursor))


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
    responses={200: _ok("Flag", _FLAG_EXAMPLE, "The alert as a FHIR Flag"), **_ERRORS},
)
async def read_flag(
    alert_id: Annotated[
        UUID, Path(description="The alert's id (the Flag's id)", examples=[_EXAMPLE_ALERT])
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
        200: _ok(
            "Bundle",
            _searchset_example(
                _FLAG_EXAMPLE, f"{_BASE}/Flag?patient={_EXAMPLE_PATIENT}&_count=1", full_url=True
            ),
            "A searchset Bundle of Flags, newest first",
        ),
        **_ERRORS,
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
            examples=[_EXAMPLE_PATIENT],
        ),
    ] = None,
    device_param: Annotated[
        str | None,
        Query(
            alias="device",
            pattern=DEVICE_REFERENCE,
            description="The pump: `{serial}` or `Device/{serial}`.",
            examples=[_EXAMPLE_SERIAL],
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
        serial = _device_serial(device_param)
        await pump_clinic(db, principal, serial)
    after = decode_cursor(cursor, 2)
    rows = await db.fetch(
        sql.FHIR_UNRESOLVED_ALERTS,
        scope_of(principal),
        serial,
        patient_id,
        None if after is None else _cursor_time(after[0]),
        None if after is None else cursor_uuid(after[1]),
        count + 1,
    )
    base = _base(request)
    entries = [_entry(flag(r, principal), f"{base}/Flag/{r['id']}") for r in rows[:count]]
    next_cursor = None
    if len(rows) > count:
        last = rows[count - 1]
        next_cursor = encode_cursor(last["opened_at"].isoformat(), last["id"])
    return FhirResponse(searchset(request, entries, next_cursor))
