"""The patient report (contract 1.1, "Integrators" - "Exports"): a printable HTML page, or a
PDF when the request accepts ``application/pdf`` or says ``?format=pdf``."""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from services.api import report_pdf, reports
from services.api.common import Auth, Db

router = APIRouter(prefix="/v1/patients", tags=["patients"])

PDF = "application/pdf"
_WHEN = "A date (YYYY-MM-DD: midnight at the clinic) or an RFC 3339 time."


def wants_pdf(request: Request, format: str | None) -> bool:
    """``?format=`` decides; else the Accept header: PDF when it ranks application/pdf at
    least as high as text/html."""
    if format is not None:
        return format == "pdf"
    ranks: dict[str, float] = {}
    for part in request.headers.get("accept", "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        ranks[media.lower()] = max(quality, ranks.get(media.lower(), 0.0))
    pdf = ranks.get(PDF, 0.0)
    return pdf > 0 and pdf >= max(ranks.get("text/html", 0.0), ranks.get("text/*", 0.0))


def pdf_response(report: reports.Report, content: bytes, disposition: str) -> Response:
    name = f"pumpwatch-report-{report.since:%Y%m%d}-{report.until:%Y%m%d}.pdf"
    return Response(
        content,
        media_type=PDF,
        headers={"Content-Disposition": f'{disposition}; filename="{name}"'},
    )


@router.get(
    "/{patient_id}/report",
    summary="The patient's report over a period: therapy, dose history, refills, alerts",
    response_model=None,
    responses={
        200: {
            "description": "A printable HTML page (print stylesheet), or a PDF",
            "content": {
                "text/html": {"schema": {"type": "string"}},
                PDF: {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
)
async def patient_report(
    patient_id: UUID,
    principal: Auth,
    db: Db,
    request: Request,
    since: Annotated[
        str | None,
        Query(alias="from", max_length=40, description=f"Start; default 12 months ago. {_WHEN}"),
    ] = None,
    until: Annotated[
        str | None, Query(max_length=40, description=f"End; default now. {_WHEN}")
    ] = None,
    format: Annotated[
        Literal["html", "pdf"] | None,
        Query(description="`pdf` or `html`; without it, the Accept header decides."),
    ] = None,
) -> Response:
    """The therapy, the dose history (each change and its percentage, the dose-escalation
    rule's signal in words), refills with their reconciliation and alerts with their history,
    over `from` to `until` (at most three years); times in the clinic's zone, named. Only the
    periods in which the patient had the pump (custody). Not for the fleet role (403)."""
    report = await reports.load(db, principal, patient_id, since, until)
    if wants_pdf(request, format):
        content = await run_in_threadpool(report_pdf.render, report)
        return pdf_response(report, content, "inline")
    return HTMLResponse(reports.html(report))
