"""The dashboard's patient list: search by name or MRN, and register a new patient.

Both call the JSON API's own route functions with the session's principal (the same checks,
transaction and audit row); a refused form comes back with what is wrong in words."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from services.api import models
from services.api.auth import Principal
from services.api.common import Db
from services.api.problems import Problem
from services.api.routes import patients as patient_routes
from services.api.routes import pumps as pump_routes
from services.api.web import sessions
from services.api.web.routes import _check_csrf, _page, _session, _to_login, _zone

router = APIRouter(include_in_schema=False)

FIELD_WORDS = {
    "mrn": "MRN",
    "display_name": "Name",
    "birth_date": "Date of birth",
    "withdrawal_risk": "Withdrawal risk",
    "low_alarm_margin_ml": "Personal low alarm",
}
LISTED = 200


def field_errors(exc: ValidationError, words: dict[str, str]) -> list[str]:
    """A model's validation errors as sentences naming the form's fields."""
    found = []
    for error in exc.errors():
        where = [str(part) for part in error["loc"] if str(part) in words]
        label = words[where[-1]] if where else "The form"
        said = "required" if error["type"] == "missing" else error["msg"]
        found.append(f"{label}: {said}")
    return found


async def pumps_by_patient(db: Db, principal: Principal) -> dict[Any, models.PumpState]:
    """The clinic's pumps, by the patient each is implanted in (the API's pump list)."""
    found: dict[Any, models.PumpState] = {}
    cursor = None
    while True:
        page = await pump_routes.list_pumps(
            principal, db, patient_id=None, limit=500, cursor=cursor
        )
        for pump in page.items:
            if pump.patient_id is not None:
                found[pump.patient_id] = pump
        cursor = page.next_cursor
        if cursor is None:
            return found


async def _list_page(
    db: Db,
    session: sessions.Session,
    q: str,
    *,
    errors: list[str] | None = None,
    form: dict[str, str] | None = None,
    status: int = 200,
) -> Response:
    principal = session.principal
    if principal.role == "fleet":
        return _page("missing.html", status=404, session=session)
    found = await patient_routes.list_patients(
        principal, db, q=q or None, limit=LISTED, cursor=None
    )
    return _page(
        "patients.html",
        status=status,
        session=session,
        patients=found.items,
        more=found.next_cursor is not None,
        pumps=await pumps_by_patient(db, principal),
        q=q,
        errors=errors or [],
        form=form or {},
        may_register=principal.clinic_id is not None
        and principal.role in ("clinician", "clinic_admin"),
        tz=await _zone(db, principal.clinic_id),
    )


@router.get("/patients", tags=["patients"])
async def patients(request: Request, db: Db, q: str = "") -> Response:
    session = await _session(db, request)
    if session is None:
        return _to_login(request)
    return await _list_page(db, session, q.replace("\x00", "")[:200].strip())


@router.post("/patients", tags=["patients"])
async def register(
    request: Request,
    db: Db,
    csrf_token: Annotated[str, Form(max_length=200)] = "",
    mrn: Annotated[str, Form(max_length=200)] = "",
    display_name: Annotated[str, Form(max_length=400)] = "",
    birth_date: Annotated[str, Form(max_length=40)] = "",
    withdrawal_risk: Annotated[str, Form(max_length=40)] = "standard",
    low_alarm_margin_ml: Annotated[str, Form(max_length=40)] = "",
) -> Response:
    """A new patient of the signed-in person's clinic (the API's create: its checks, its
    audit row naming the person)."""
    session = await _session(db, request)
    if session is None:
        return _to_login(request)
    _check_csrf(session, csrf_token)
    form = {
        "mrn": mrn.strip(),
        "display_name": display_name.strip(),
        "birth_date": birth_date.strip(),
        "withdrawal_risk": withdrawal_risk,
        "low_alarm_margin_ml": low_alarm_margin_ml.strip(),
    }
    given = {k: v for k, v in form.items() if v != ""}
    try:
        body = models.PatientIn.model_validate(given)
    except ValidationError as exc:
        errors = field_errors(exc, FIELD_WORDS)
        return await _list_page(db, session, "", errors=errors, form=form, status=422)
    try:
        created = await patient_routes.create_patient(body, session.principal, db, request)
    except Problem as exc:
        if exc.status not in (403, 404, 409, 422):
            raise
        return await _list_page(db, session, "", errors=[exc.detail], form=form, status=exc.status)
    return RedirectResponse(f"/patients/{created.id}", status_code=303)
