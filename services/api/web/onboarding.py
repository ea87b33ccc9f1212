"""Pump onboarding in the dashboard: claim a pump with the code its programmer shows, assign a
pump the clinic holds to a patient, or move it to another patient of the clinic.

Each goes through the API's own custody route (``PUT /v1/pumps/{serial}``: the claim-code checks
and their limit, the custody history, the alerts following the pump, the audit row naming the
person); a refusal comes back on the form in words."""

from __future__ import annotations

import re
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from services.api import models, sql
from services.api.common import Db
from services.api.problems import Problem
from services.api.routes import patients as patient_routes
from services.api.routes import pumps as pump_routes
from services.api.web import sessions
from services.api.web.routes import _check_csrf, _page, _session, _to_login

router = APIRouter(include_in_schema=False)

SERIAL = re.compile(r"^[A-Za-z0-9-]{4,32}$")
CLAIM_CODE = re.compile(r"^[A-Za-z0-9]{6,12}$")
MAY_ASSIGN = ("clinician", "clinic_admin")


def _words(exc: Problem, serial: str, claiming: bool) -> str:
    """The custody route's refusal as the form says it."""
    if exc.status == 404:
        return (
            f"No pump {serial} is known to your clinic. Check the serial on the programmer; a "
            "pump another clinic holds cannot be claimed (that clinic, or an administrator, "
            "must release it first)."
        )
    if exc.status == 403 and claiming:
        return f"Claim code refused: {exc.detail}."
    return str(exc.detail)


async def _form(
    db: Db,
    session: sessions.Session,
    *,
    patient_id: UUID | None = None,
    serial: str = "",
    error: str | None = None,
    status: int = 200,
) -> Response:
    principal = session.principal
    if principal.clinic_id is None or principal.role not in MAY_ASSIGN:
        return _page("missing.html", status=404, session=session)
    patients = []
    cursor = None
    while True:
        page = await patient_routes.list_patients(principal, db, q=None, limit=500, cursor=cursor)
        patients.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    names = {p.id: p for p in patients}
    # The clinic's pumps, unassigned first: serials and patients are all the form shows.
    held = await db.fetch(sql.CLINIC_PUMPS_FOR_FORM, principal.clinic_id)
    return _page(
        "assign.html",
        status=status,
        session=session,
        patients=patients,
        names=names,
        held=held,
        patient_id=patient_id,
        serial=serial,
        error=error,
    )


def _wrong(serial: str, code: str, patient: UUID | None) -> str | None:
    """What is wrong with the form, in words (None: nothing)."""
    if not SERIAL.match(serial):
        return (
            "Enter the pump's serial number as the programmer shows it (4 to 32 letters, "
            "digits or dashes)."
        )
    if code and not CLAIM_CODE.match(code):
        return "A claim code is 6 to 12 letters and digits, as the programmer shows it."
    if patient is None and not code:
        return "Choose the patient the pump is implanted in."
    return None


@router.get("/pumps/assign", tags=["pumps"])
async def assign_form(request: Request, db: Db, patient_id: UUID | None = None) -> Response:
    session = await _session(db, request)
    if session is None:
        return _to_login(request)
    return await _form(db, session, patient_id=patient_id)


@router.post("/pumps/assign", tags=["pumps"])
async def assign(
    request: Request,
    db: Db,
    csrf_token: Annotated[str, Form(max_length=200)] = "",
    serial: Annotated[str, Form(max_length=64)] = "",
    claim_code: Annotated[str, Form(max_length=64)] = "",
    patient_id: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """Claim (a serial and its code) or assign/move (a pump the clinic holds) to a patient."""
    session = await _session(db, request)
    if session is None:
        return _to_login(request)
    _check_csrf(session, csrf_token)
    serial = serial.strip().upper()
    code = re.sub(r"[\s-]", "", claim_code).upper()
    patient: UUID | None = None
    if patient_id:
        try:
            patient = UUID(patient_id)
        except ValueError:
            patient = None

    async def refused(words: str, status: int = 422) -> Response:
        return await _form(
            db, session, patient_id=patient, serial=serial, error=words, status=status
        )

    wrong = _wrong(serial, code, patient)
    if wrong is not None:
        return await refused(wrong)
    try:
        body = models.PumpIn(patient_id=patient, claim_code=code or None)
    except ValidationError as exc:
        return await refused("; ".join(e["msg"] for e in exc.errors()))
    try:
        await pump_routes.put_pump(serial, body, session.principal, db, request, Response())
    except Problem as exc:
        if exc.status not in (403, 404, 409, 422, 429):
            raise
        return await refused(_words(exc, serial, bool(code)), exc.status)
    target = f"/patients/{patient}" if patient is not None else "/pumps/assign"
    return RedirectResponse(target, status_code=303)
