"""The patient page's therapy and titration section, alert histories and snooze choices, and
the dashboard's way to the patient report (the API's report, for the session's user).

The facts are the report's (services/api/reports.py): the same custody periods, the same
dose history and the same words for the dose-escalation signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from services.api import models, report_pdf, reports
from services.api.auth import Principal
from services.api.common import Db
from services.api.problems import Problem
from services.api.routes import reports as report_routes
from services.api.settings import ApiSettings
from services.api.web import sessions
from services.storage.database import Connection

router = APIRouter(include_in_schema=False)

SNOOZE_HOURS = (1, 2, 4, 8, 12, 24)
"""What the page offers (the API's limits cut it: 24 h, 4 h for a high priority alert)."""


MAX_SNOOZE_FORM_HOURS = 10_000
"""Beyond this a posted duration is no time at all (the API's limit, 24 h, says the rest)."""


@dataclass(frozen=True, slots=True)
class PatientExtras:
    report: reports.Report
    """The last 12 months: therapy, dose history, tolerance signal."""
    histories: dict[UUID, list[models.HistoryEntry]]
    """Each alert's history on the page, oldest first."""


async def extras(
    db: Connection, principal: Principal, patient_id: UUID, alerts: list[models.AlertOut]
) -> PatientExtras:
    report = await reports.load(db, principal, patient_id, therapy_only=True)
    return PatientExtras(report, await reports.histories(db, [a.id for a in alerts]))


def snooze_choices(settings: ApiSettings, priority: str) -> list[int]:
    high = priority == "high"
    hours = settings.api_snooze_high_max_hours if high else settings.api_snooze_max_hours
    return [h for h in SNOOZE_HOURS if h <= hours]


def snooze_body(hours: str, note: str, now: datetime) -> models.SnoozeIn:
    """The snooze form as the API's body; a missing note or duration said in words."""
    if not note.strip():
        raise Problem(
            422, "write a note: why the reminders may wait (e.g. who was called)", kind="validation"
        )
    try:
        chosen = float(hours)
    except ValueError:
        raise Problem(422, "choose how long to snooze the reminders", kind="validation") from None
    if not 0 < chosen <= MAX_SNOOZE_FORM_HOURS:  # also NaN; the API's own limit comes after
        raise Problem(422, "choose how long to snooze the reminders", kind="validation")
    return models.SnoozeIn(until=now + timedelta(hours=chosen), note=note.strip())


# --- the report, for the session's user ---------------------------------------------------------


async def _report(
    request: Request, db: Db, patient_id: UUID, since: str | None, until: str | None
) -> reports.Report | Response:
    session = await sessions.current(db, request)
    if session is None:
        return RedirectResponse("/login", status_code=303)
    try:
        return await reports.load(db, session.principal, patient_id, since, until)
    except Problem as exc:
        if exc.status in (403, 404):
            page = reports.templates.get_template("missing.html").render(session=session)
            return HTMLResponse(page, status_code=404)
        raise


@router.get("/patients/{patient_id}/report", tags=["dashboard"])
async def report_page(
    patient_id: UUID, request: Request, db: Db, until: str | None = None
) -> Response:
    """The API's report page with a way back, a print button and the PDF link."""
    since = request.query_params.get("from")
    found = await _report(request, db, patient_id, since, until)
    if not isinstance(found, reports.Report):
        return found
    query = request.url.query
    links = {
        "back": f"/patients/{patient_id}",
        "pdf": f"/patients/{patient_id}/report.pdf" + (f"?{query}" if query else ""),
    }
    return HTMLResponse(reports.html(found, links=links))


@router.get("/patients/{patient_id}/report.pdf", tags=["dashboard"])
async def report_pdf_download(
    patient_id: UUID, request: Request, db: Db, until: str | None = None
) -> Response:
    since = request.query_params.get("from")
    found = await _report(request, db, patient_id, since, until)
    if not isinstance(found, reports.Report):
        return found
    content = await run_in_threadpool(report_pdf.render, found)
    return report_routes.pdf_response(found, content, "attachment")
