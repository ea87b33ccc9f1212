"""The dashboard's patient list: search by name or MRN, and register a new patient.

Both call the JSON API's own route functions with the session's principal (the same checks,
transaction and audit row); a refused form comes back with what is wrong in words. The listed
patients' pumps, refill deadlines and booked visits come from the forecast read model."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from services.api import models, sql, views
from services.api.auth import Principal
from services.api.common import Db, scope_of
from services.api.problems import Problem
from services.api.routes import patients as patient_routes
from services.api.web import sessions
from services.api.web.routes import _check_csrf, _page, _session, _to_login, _zone
from services.storage import forecasts

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


@dataclass(frozen=True, slots=True)
class PatientPump:
    """What the patient list shows of a patient's pump."""

    serial: str
    refill_deadline_at: datetime | None
    refill_deadline_reason: str | None
    refill_appointment_at: datetime | None


async def pumps_by_patient(
    db: Db, principal: Principal, patient_ids: list[UUID]
) -> dict[UUID, PatientPump]:
    """These patients' pumps that the principal's clinic holds, by patient, from the forecast
    read model in one query. A stale row's pump (the engine has not evaluated it since a refill,
    a move or a change of settings, or at all) is forecast from its snapshot here, as the
    worklist does. The deadline is shown once the pump has sent a reading, as in the API's
    forecast object."""
    if not patient_ids:
        return {}
    rows = await db.fetch(sql.PATIENT_PUMPS, patient_ids, scope_of(principal))
    stale = [r["serial"] for r in rows if r["stale"]]
    computed = {}
    if stale:
        found = await views.snapshots(db, stale)
        computed = {serial: forecasts.of(snapshot) for serial, snapshot in found.items()}
    pumps = {}
    for row in rows:
        forecast = computed.get(row["serial"])
        if forecast is None:  # the engine's
            contact, at, reason = row["last_contact_at"], row["deadline_at"], row["deadline_reason"]
        else:
            contact, at, reason = (
                forecast.last_contact_at,
                forecast.deadline_at,
                forecast.deadline_reason,
            )
        pumps[row["patient_id"]] = PatientPump(
            serial=row["serial"],
            refill_deadline_at=None if contact is None else at,
            refill_deadline_reason=None if contact is None else reason,
            refill_appointment_at=row["refill_appointment_at"],
        )
    return pumps


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
        pumps=await pumps_by_patient(db, principal, [p.id for p in found.items]),
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
