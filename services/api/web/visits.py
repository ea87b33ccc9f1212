"""The refill visit in the dashboard: book, change or cancel it (in the clinic's time zone,
named), and the guided refill itself — the expected residual with the refill deadline, the
measured residual, drug, concentration and volume added — then the verdict.

Booking calls the API's ``PUT /v1/pumps/{serial}/refill-appointment`` route function; the refill
is recorded by the API's ``POST /v1/pumps/{serial}/refills`` route function (the MQTT refill
event's path: the contract's checks, the events table, the outbox, history and audit rows in one
transaction, the person recorded). The verdict is the domain's own arithmetic
(:func:`services.domain.rules.reconciliations`) and the refill-discrepancy rule's words."""

from __future__ import annotations

import re
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from services.api import models, views
from services.api.common import Db
from services.api.problems import Problem
from services.api.routes import patients as patient_routes
from services.api.routes import pumps as pump_routes
from services.api.routes import refills as refill_routes
from services.api.web import sessions
from services.api.web.onboarding import SERIAL
from services.api.web.patients import field_errors
from services.api.web.routes import _check_csrf, _page, _session, _to_login, _zone
from services.domain import rules
from services.domain.alerting import Refill, Rule, RuleSettings, Snapshot
from services.domain.rules import reconciliation
from services.domain.rules.common import View
from services.storage.database import Connection

router = APIRouter(include_in_schema=False)

MAY_ACT = ("clinician", "clinic_admin", "admin")
LOCAL_INPUT = "%Y-%m-%dT%H:%M"
REFILL_WORDS = {
    "residual_ml": "Measured residual",
    "added_ml": "Volume added",
    "drug": "Drug",
    "concentration_mcg_per_ml": "Concentration",
}
VERDICT_WORDS = {
    "over_delivery": "Less drug was left than expected: suspected over-infusion, drug lost into "
    "the pocket at an earlier refill (pocket fill), or boluses that were not logged. Risk: "
    "overdose now, and an early empty reservoir.",
    "under_delivery": "More drug was left than expected: less reached the patient — suspected "
    "catheter occlusion or a pump (motor) stall. Risk: withdrawal.",
    "none": "Within limits: what was left matches what the pump was programmed to deliver.",
}


LOCAL_PATH = re.compile(r"/(?![/\\])[A-Za-z0-9/_.~%?=&#-]*")
"""A path of this site: no scheme, no host, no backslash, no whitespace or control character
(browsers drop tabs and newlines from a URL, so "/\t/host" would leave the site)."""


def _next(target: str, fallback: str) -> str:
    """Where to go back to: a path of this site only."""
    return target if len(target) <= 500 and LOCAL_PATH.fullmatch(target) else fallback


def _local_input(at: datetime | None, tz: tzinfo) -> str:
    return "" if at is None else at.astimezone(tz).strftime(LOCAL_INPUT)


def parse_local(value: str, tz: tzinfo, zone_name: str) -> datetime:
    """A ``datetime-local`` value read as the clinic's wall time; ValueError in words."""
    try:
        wall = datetime.strptime(value.strip(), LOCAL_INPUT)
    except ValueError:
        raise ValueError("Enter the visit's date and time (e.g. 2026-12-08 09:30).") from None
    at = wall.replace(tzinfo=tz)
    back = at.astimezone(UTC).astimezone(tz).replace(tzinfo=None)
    if back != wall:
        raise ValueError(
            f"{wall:%Y-%m-%d %H:%M} does not exist in {zone_name}: the clocks go forward "
            "then. Choose another time."
        )
    return at.astimezone(UTC)


async def _pump_and_patient(
    db: Connection, session: sessions.Session, serial: str
) -> tuple[models.PumpState, models.Patient | None] | None:
    """The pump (and its patient) if the person's clinic holds it, else None."""
    principal = session.principal
    if principal.role == "fleet" or not SERIAL.match(serial):
        return None
    try:
        pump = await pump_routes.get_pump(serial, principal, db)
        patient = (
            None
            if pump.patient_id is None
            else await patient_routes.get_patient(pump.patient_id, principal, db)
        )
    except Problem as exc:
        if exc.status in (403, 404, 422):
            return None
        raise
    return pump, patient


# --- booking -------------------------------------------------------------------------------------


async def _visit_page(
    db: Connection,
    session: sessions.Session,
    serial: str,
    back: str,
    *,
    error: str | None = None,
    value: str | None = None,
    status: int = 200,
) -> Response:
    found = await _pump_and_patient(db, session, serial)
    if found is None:
        return _page("missing.html", status=404, session=session)
    pump, patient = found
    tz = await _zone(db, pump.clinic_id)
    deadline = pump.forecast.refill_deadline_at if pump.forecast else None
    late = (
        pump.refill_appointment_at is not None
        and deadline is not None
        and pump.refill_appointment_at > deadline
    )
    return _page(
        "visit.html",
        status=status,
        session=session,
        pump=pump,
        patient=patient,
        tz=tz,
        zone=str(tz),
        value=value if value is not None else _local_input(pump.refill_appointment_at, tz),
        late=late,
        back=back,
        error=error,
        may_act=session.principal.role in MAY_ACT,
    )


@router.get("/pumps/{serial}/visit", tags=["pumps"])
async def visit_form(serial: str, request: Request, db: Db, next: str = "/") -> Response:
    session = await _session(db, request)
    if session is None:
        return _to_login(request)
    return await _visit_page(db, session, serial, _next(next, "/"))


@router.post("/pumps/{serial}/visit", tags=["pumps"])
async def book_visit(
    serial: str,
    request: Request,
    db: Db,
    csrf_token: Annotated[str, Form(max_length=200)] = "",
    when: Annotated[str, Form(max_length=40)] = "",
    action: Annotated[str, Form(max_length=20)] = "book",
    back: Annotated[str, Form(max_length=500)] = "/",
) -> Response:
    """Book or change (``when``, the clinic's wall time) or cancel the refill visit."""
    session = await _session(db, request)
    if session is None:
        return _to_login(request)
    _check_csrf(session, csrf_token)
    back = _next(back, "/")
    found = await _pump_and_patient(db, session, serial)
    if found is None:
        return _page("missing.html", status=404, session=session)
    pump, _ = found
    at: datetime | None = None
    if action != "cancel":
        tz = await _zone(db, pump.clinic_id)
        try:
            at = parse_local(when, tz, str(tz))
        except ValueError as exc:
            return await _visit_page(
                db, session, serial, back, error=str(exc), value=when, status=422
            )
        if at < datetime.now(UTC) - timedelta(minutes=5):
            words = "That time has passed: book the visit for a time still to come."
            return await _visit_page(db, session, serial, back, error=words, value=when, status=422)
    try:
        await pump_routes.put_appointment(
            serial, models.AppointmentIn(scheduled_for=at), session.principal, db, request
        )
    except Problem as exc:
        if exc.status not in (403, 404, 422):
            raise
        return await _visit_page(
            db, session, serial, back, error=exc.detail, value=when, status=exc.status
        )
    return RedirectResponse(back, status_code=303)


# --- the refill visit ----------------------------------------------------------------------------


def expected_now(snapshot: Snapshot, at: datetime) -> reconciliation.Reconciliation | None:
    """What a refill at ``at`` should find left: the reconciliation's own arithmetic for a
    refill recorded then (its residual not yet measured)."""
    probe = Refill(at, residual_ml=0.0, added_ml=0.0, drug="", concentration_mcg_per_ml=1.0)
    found = rules.reconciliations(replace(snapshot, now=at, refills=(*snapshot.refills, probe)))
    return found[-1][1] if found and found[-1][0] is probe else None


async def _refill_page(
    db: Connection,
    session: sessions.Session,
    serial: str,
    *,
    form: dict[str, str] | None = None,
    errors: list[str] | None = None,
    status: int = 200,
) -> Response:
    found = await _pump_and_patient(db, session, serial)
    if found is None or session.principal.role not in MAY_ACT:
        return _page("missing.html", status=404, session=session)
    pump, patient = found
    now = datetime.now(UTC)
    snapshot = (await views.snapshots(db, [serial], now=now)).get(serial)
    expected = None if snapshot is None else expected_now(snapshot, now)
    therapy = pump.therapy
    defaults = {
        "msg_id": str(uuid.uuid4()),
        "residual_ml": "",
        "drug": therapy.drug_name if therapy else "",
        "concentration_mcg_per_ml": f"{therapy.concentration_mcg_per_ml:g}" if therapy else "",
        "added_ml": f"{pump.capacity_ml:g}" if pump.capacity_ml else "",
    }
    return _page(
        "refill.html",
        status=status,
        session=session,
        pump=pump,
        patient=patient,
        expected=expected,
        tz=await _zone(db, pump.clinic_id),
        form=defaults | (form or {}),
        errors=errors or [],
    )


@router.get("/pumps/{serial}/refill", tags=["refills"])
async def refill_form(serial: str, request: Request, db: Db) -> Response:
    session = await _session(db, request)
    if session is None:
        return _to_login(request)
    return await _refill_page(db, session, serial)


@router.post("/pumps/{serial}/refill", tags=["refills"])
async def record_refill(
    serial: str,
    request: Request,
    db: Db,
    csrf_token: Annotated[str, Form(max_length=200)] = "",
    msg_id: Annotated[str, Form(max_length=64)] = "",
    residual_ml: Annotated[str, Form(max_length=40)] = "",
    drug: Annotated[str, Form(max_length=200)] = "",
    concentration_mcg_per_ml: Annotated[str, Form(max_length=40)] = "",
    added_ml: Annotated[str, Form(max_length=40)] = "",
) -> Response:
    """Record the refill through the API's refill route and show the verdict."""
    session = await _session(db, request)
    if session is None:
        return _to_login(request)
    _check_csrf(session, csrf_token)
    form = {
        "msg_id": msg_id,
        "residual_ml": residual_ml.strip().replace(",", "."),
        "drug": drug.strip(),
        "concentration_mcg_per_ml": concentration_mcg_per_ml.strip().replace(",", "."),
        "added_ml": added_ml.strip().replace(",", "."),
    }
    try:
        key = uuid.UUID(msg_id)
    except ValueError:
        key = uuid.uuid4()
        form["msg_id"] = str(key)
    body = _refill_body(form, key)
    if isinstance(body, list):
        return await _refill_page(db, session, serial, form=form, errors=body, status=422)
    found = await _pump_and_patient(db, session, serial)
    if found is None:
        return _page("missing.html", status=404, session=session)
    pump, patient = found
    if pump.capacity_ml and body.refill.added_ml > pump.capacity_ml:
        errors = [
            f"Volume added: {body.refill.added_ml:g} mL is more than the {pump.capacity_ml:g} mL "
            "reservoir holds."
        ]
        return await _refill_page(db, session, serial, form=form, errors=errors, status=422)
    try:
        result = await refill_routes.record_refill(
            serial, body, session.principal, db, request, Response()
        )
    except Problem as exc:
        if exc.status not in (403, 404, 409, 422):
            raise
        return await _refill_page(
            db, session, serial, form=form, errors=[exc.detail], status=exc.status
        )
    return await _verdict(db, session, serial, result, patient)


def _refill_body(form: dict[str, str], key: uuid.UUID) -> models.RefillIn | list[str]:
    """The API's refill body from the form, or what is wrong with it in words."""
    fields = {k: v for k, v in form.items() if k != "msg_id" and v != ""}
    missing = [label for k, label in REFILL_WORDS.items() if k not in fields]
    if missing:
        return [f"{label}: required" for label in missing]
    try:
        return models.RefillIn(refill=models.RefillBody.model_validate(fields), msg_id=key)
    except ValidationError as exc:
        return field_errors(exc, REFILL_WORDS)


async def _verdict(
    db: Connection,
    session: sessions.Session,
    serial: str,
    result: models.RefillOut,
    patient: models.Patient | None,
) -> Response:
    """The recorded refill, its discrepancy by the pump's size and the relative rule with what
    to do in words, and the new forecast."""
    upto = result.recorded_at + timedelta(microseconds=1)
    then = (await views.snapshots(db, [serial], now=upto)).get(serial)
    detail: dict[str, Any] = {}
    if then is not None:
        settings = then.settings or RuleSettings()
        pair = next(
            (p for p in rules.reconciliations(then) if p[0].recorded_at == result.recorded_at),
            None,
        )
        if pair is not None and pair[1] is not None:
            found = pair[1]
            detail = {
                "capacity_ml": found.capacity_ml,
                "should_have_ml": found.should_have_delivered_ml,
                "limit_ml": found.limit_ml(settings),
                "rel_fraction": settings.discrepancy_rel_fraction,
                "small_max_ml": settings.discrepancy_small_pump_max_ml,
                "small_abs_ml": settings.discrepancy_small_pump_abs_ml,
                "abs_ml": settings.discrepancy_abs_ml,
            }
        check = reconciliation.CHECKS[Rule.REFILL_DISCREPANCY]
        finding = check(View(then))
        if finding is not None:
            detail["finding"] = finding
    pump = await pump_routes.get_pump(serial, session.principal, db)
    kind = result.discrepancy.classification if result.discrepancy else None
    return _page(
        "verdict.html",
        session=session,
        r=result,
        pump=pump,
        patient=patient,
        kind=kind,
        words=VERDICT_WORDS.get(kind or ""),
        detail=detail,
        tz=await _zone(db, pump.clinic_id),
    )
