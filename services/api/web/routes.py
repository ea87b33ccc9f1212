"""The dashboard's pages: sign-in, the clinic worklist, the patient page, the fleet overview.

Pages call the JSON API's own route functions with the session's principal, so tenancy, audit
and forecasts are the API's. Every form carries the session's CSRF token."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta, tzinfo
from importlib import resources
from typing import Annotated, Any
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from services.api import audit, keys, models, people, reports, signin, sql
from services.api import worklist as worklist_model
from services.api.auth import Principal, key_row
from services.api.common import Db
from services.api.problems import Problem
from services.api.routes import alerts as alert_routes
from services.api.routes import auth as auth_routes
from services.api.routes import patients as patient_routes
from services.api.routes import refills as refill_routes
from services.api.web import sessions
from services.api.web import therapy as therapy_page
from services.api.web.chart import Chart, Point, RefillMark, render
from services.domain import rules, therapy
from services.domain.alerting import Snapshot
from services.storage.database import Connection

router = APIRouter(include_in_schema=False)

templates = Environment(
    loader=PackageLoader("services.api.web", "templates"),
    autoescape=select_autoescape(["html"]),
)


# Times and people as the report writes them (one wording for both).
templates.filters["local"] = reports.local
templates.filters["who"] = reports.who
templates.globals["deadline_words"] = rules.deadlines.REASON_WORDS
STATIC_DIR = resources.files("services.api.web").joinpath("static")
CHART_DAYS = 90
PRIORITY_ORDER = {"high": 0, "medium": 1, "low": 2}


def _page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = templates.get_template(name).render(**context)
    return HTMLResponse(html, status_code=status)


def _to_login(request: Request) -> RedirectResponse:
    return RedirectResponse("/login", status_code=303)


def _secure(request: Request) -> bool:
    """Cookies only over https: this request's scheme (its proxy's, when trusted), or the
    configured public URL's (a TLS-terminating proxy in front)."""
    public: str = request.app.state.settings.api_public_url
    return request.url.scheme == "https" or public.lower().startswith("https://")


async def _session(db: Db, request: Request) -> sessions.Session | None:
    return await sessions.current(db, request)


def _check_csrf(session: sessions.Session, token: str | None) -> None:
    if not sessions.csrf_ok(session.csrf_token, token):
        raise Problem(
            403, "the form's CSRF token is missing or wrong; reload the page", kind="csrf"
        )


# --- sign-in -------------------------------------------------------------------------------------


def _form_cookie(request: Request, response: Response, token: str) -> Response:
    response.set_cookie(
        sessions.LOGIN_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        max_age=900,
    )
    return response


@router.get("/login")
async def login_form(request: Request, password: str | None = None) -> Response:
    token = secrets.token_urlsafe(24)
    notice = "Your password is set: sign in with it." if password == "set" else None  # noqa: S105
    page = _page("login.html", csrf_token=token, error=None, notice=notice, email="")
    return _form_cookie(request, page, token)


@router.post("/login")
async def login(
    request: Request,
    db: Db,
    email: Annotated[str, Form(max_length=254)] = "",
    password: Annotated[str, Form(max_length=200)] = "",
    key: Annotated[str, Form(max_length=200)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """A person signs in with email and password (the API's sign-in: the same lockout and
    audit); a machine's API key still opens the dashboard (device teams' fleet page)."""
    if not sessions.csrf_ok(request.cookies.get(sessions.LOGIN_COOKIE, "\0"), csrf_token):
        raise Problem(403, "the sign-in form expired; reload it", kind="csrf")
    settings = request.app.state.settings
    if key.strip():
        row = await key_row(request, db, keys.hash_key(key.strip()))
        if row is None:
            return _page(
                "login.html",
                status=401,
                csrf_token=csrf_token,
                error="Unknown or revoked key.",
                notice=None,
                email="",
            )
        principal = Principal(row["id"], row["role"], row["clinic_id"], name=row["label"])
        request.state.principal = principal
        lifetime = settings.web_session_hours * 3600
        resource = ("keys", row["id"])
    else:
        try:
            principal = await signin.sign_in(db, request, email, password)
        except Problem as exc:
            if exc.status not in (401, 429):
                raise
            words = "Unknown email or wrong password." if exc.status == 401 else exc.detail
            return _page(
                "login.html",
                status=exc.status,
                csrf_token=csrf_token,
                error=words,
                notice=None,
                email=email,
            )
        lifetime = settings.api_token_lifetime_s
        resource = ("users", principal.user_id)
    async with db.transaction():
        token = await sessions.create(db, request, principal, lifetime)
        await audit.record(
            db,
            request,
            action="post sign-in (dashboard)",
            resource_type=resource[0],
            resource_id=resource[1],
            clinic_id=principal.clinic_id,
            status=303,
        )
    target = "/fleet" if principal.role == "fleet" else "/"
    response: Response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        sessions.COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        max_age=int(lifetime),
    )
    response.delete_cookie(sessions.LOGIN_COOKIE)
    return response


@router.post("/logout")
async def logout(
    request: Request, db: Db, csrf_token: Annotated[str, Form(max_length=200)] = ""
) -> Response:
    session = await _session(db, request)
    if session is not None:
        _check_csrf(session, csrf_token)
        async with db.transaction():
            await sessions.end(db, request)
            who = session.principal
            await audit.record(
                db,
                request,
                action="post sign-out (dashboard)",
                resource_type="users" if who.user_id else "keys",
                resource_id=who.user_id or who.key_id,
                clinic_id=who.clinic_id,
                status=303,
            )
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(sessions.COOKIE)
    return response


@router.get(people.LINK_PATH + "{token}")
async def set_password_form(token: str, request: Request) -> Response:
    """The page an invitation or reset link opens: choose a password (the link is spent only
    when the form is sent)."""
    form_token = secrets.token_urlsafe(24)
    page = _set_password_page(request, token, form_token, None, 200)
    return _form_cookie(request, page, form_token)


def _set_password_page(
    request: Request, token: str, csrf_token: str, error: str | None, status: int
) -> Response:
    return _page(
        "set_password.html",
        status=status,
        csrf_token=csrf_token,
        error=error,
        action=people.LINK_PATH + token,
        min_length=request.app.state.settings.api_password_min_length,
    )


@router.post(people.LINK_PATH + "{token}")
async def set_password(
    token: str,
    request: Request,
    db: Db,
    password: Annotated[str, Form(max_length=200)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    if not sessions.csrf_ok(request.cookies.get(sessions.LOGIN_COOKIE, "\0"), csrf_token):
        raise Problem(403, "the form expired; reload it", kind="csrf")
    if len(token) > 200:
        return _set_password_page(request, "", csrf_token, "This link does not work.", 400)
    try:
        await auth_routes.set_with_link(db, request, token, password)
    except Problem as exc:
        if exc.status not in (400, 422):
            raise
        return _set_password_page(request, token, csrf_token, exc.detail, exc.status)
    response = RedirectResponse("/login?password=set", status_code=303)
    response.delete_cookie(sessions.LOGIN_COOKIE)
    return response


# --- worklist ------------------------------------------------------------------------------------


async def _worklist(
    db: Db, principal: Principal, priority: str | None, within_days: float
) -> dict[str, Any]:
    found = await alert_routes.list_alerts(
        principal,
        db,
        status=None,
        priority=None,
        serial=None,
        patient_id=None,
        limit=500,
        cursor=None,
    )
    open_alerts = [a for a in found.items if a.status != "resolved"]
    if priority:
        open_alerts = [a for a in open_alerts if a.priority == priority]
    open_alerts.sort(key=lambda a: (PRIORITY_ORDER[a.priority], -a.opened_at.timestamp()))
    tz = await _zone(db, principal.clinic_id)
    due = await worklist_model.page(db, principal, within_days=within_days, limit=500, cursor=None)
    return {
        "alerts": open_alerts,
        "due": due.items,
        "priority": priority or "",
        "within_days": within_days,
        "now": datetime.now(UTC),
        "tz": tz,
    }


async def _zone(db: Connection, clinic_id: UUID | None) -> tzinfo:
    """The clinic's time zone (UTC for the roles that see every clinic, or an unknown zone)."""
    name = None if clinic_id is None else await db.fetchval(sql.CLINIC_TIMEZONE, clinic_id)
    try:
        return ZoneInfo(name) if name else UTC
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


@router.get("/", tags=["worklist"])
async def worklist(
    request: Request, db: Db, priority: str | None = None, within_days: float = 30
) -> Response:
    session = await _session(db, request)
    if session is None:
        return _to_login(request)
    if session.principal.role == "fleet":
        return RedirectResponse("/fleet", status_code=303)
    priority = priority if priority in PRIORITY_ORDER else None
    within_days = min(max(within_days, 1), 365)
    context = await _worklist(db, session.principal, priority, within_days)
    return _page("worklist.html", session=session, **context)


@router.get("/worklist/fragment", tags=["worklist"])
async def worklist_fragment(
    request: Request, db: Db, priority: str | None = None, within_days: float = 30
) -> Response:
    # The page refreshes itself every 30 s: that is not the person's use, so it does not keep
    # their session from idling out.
    session = await sessions.current(db, request, touch=False)
    if session is None or session.principal.role == "fleet":
        return Response(status_code=401)
    priority = priority if priority in PRIORITY_ORDER else None
    context = await _worklist(db, session.principal, priority, min(max(within_days, 1), 365))
    return _page("_worklist.html", session=session, **context)


# --- patient page --------------------------------------------------------------------------------


def _chart(
    snapshot: Snapshot | None,
    series: list[models.SeriesPoint],
    dashboard: models.Dashboard,
    refills: list[models.RefillOut],
) -> str:
    now = datetime.now(UTC)
    forecast = dashboard.pump.forecast if dashboard.pump else None
    low_at = forecast.low_alarm_at if forecast else None
    empty_at = forecast.empty_at if forecast else None
    horizon = max(now + timedelta(days=7), (empty_at or low_at or now) + timedelta(days=3))
    end = min(horizon, now + timedelta(days=200))
    projection: list[Point] = []
    state = None if snapshot is None else rules.projection_state(snapshot)
    if snapshot is not None and state is not None:
        at = state.recorded_at
        while at <= end:
            projection.append(Point(at, therapy.volume_now(state, at, snapshot.timezone)))
            if projection[-1].volume_ml <= 0:
                break
            at += timedelta(hours=12)
    marks = [
        RefillMark(
            r.recorded_at,
            f"refill {r.recorded_at:%Y-%m-%d}: +{r.added_ml:g} mL"
            + (
                ""
                if r.discrepancy is None
                else f"; expected {r.discrepancy.expected_residual_ml:g} mL left, "
                f"found {r.discrepancy.actual_residual_ml:g} mL ({r.discrepancy.classification})"
            ),
            r.discrepancy is not None and r.discrepancy.classification != "none",
        )
        for r in refills
    ]
    pump = dashboard.pump
    return render(
        Chart(
            readings=[Point(p.at, p.volume_ml) for p in series],
            projection=projection,
            low_alarm_ml=forecast.low_alarm_ml if forecast else None,
            capacity_ml=pump.capacity_ml if pump else None,
            refills=marks,
            low_alarm_at=low_at,
            empty_at=empty_at,
            start=now - timedelta(days=CHART_DAYS),
            end=end,
        )
    )


@router.get("/patients/{patient_id}", tags=["dashboard"])
async def patient_page(patient_id: UUID, request: Request, db: Db) -> Response:
    session = await _session(db, request)
    if session is None:
        return _to_login(request)
    return await _patient(patient_id, session, db, request)


async def _patient(
    patient_id: UUID,
    session: sessions.Session,
    db: Connection,
    request: Request,
    *,
    refused: dict[UUID, str] | None = None,
    status: int = 200,
) -> Response:
    """The patient page; ``refused``: an action the page explains next to its alert."""
    principal = session.principal
    try:
        loaded = await patient_routes.load_dashboard(
            patient_id, principal, db, series_days=CHART_DAYS
        )
    except Problem as exc:
        if exc.status in (403, 404):
            return _page("missing.html", status=404, session=session)
        raise
    dashboard = loaded.dashboard
    refills: list[models.RefillOut] = []
    alerts: list[models.AlertOut] = []
    if dashboard.pump is not None:
        serial = dashboard.pump.serial
        refills = (
            await refill_routes.list_refills(serial, principal, db, limit=50, cursor=None)
        ).items
        alerts = (
            await alert_routes.list_alerts(
                principal,
                db,
                status=None,
                priority=None,
                serial=serial,
                patient_id=None,
                limit=50,
                cursor=None,
            )
        ).items
    alerts.sort(key=lambda a: (a.status == "resolved", PRIORITY_ORDER[a.priority], a.opened_at))
    more = await therapy_page.extras(db, principal, patient_id, alerts)
    settings = request.app.state.settings
    return _page(
        "patient.html",
        session=session,
        d=dashboard,
        chart=_chart(loaded.snapshot, loaded.actual_points(), dashboard, refills),
        refills=refills,
        alerts=alerts,
        refused=refused or {},
        status=status,
        tz=await _zone(db, dashboard.patient.clinic_id),
        report=more.report,
        histories=more.histories,
        snooze_hours={
            p: therapy_page.snooze_choices(settings, p) for p in ("high", "medium", "low")
        },
    )


@router.post("/patients/{patient_id}/alerts/{alert_id}/{action}", tags=["alerts"])
async def alert_action(
    patient_id: UUID,
    alert_id: UUID,
    action: str,
    request: Request,
    db: Db,
    csrf_token: Annotated[str, Form(max_length=200)] = "",
    note: Annotated[str, Form(max_length=2000)] = "",
    hours: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    session = await _session(db, request)
    if session is None:
        return _to_login(request)
    _check_csrf(session, csrf_token)
    if action not in ("acknowledge", "resolve", "snooze"):
        raise Problem(404, "no such action", kind="not-found")
    body = models.NoteIn(note=note.strip() or None)
    # The audit row names the alert acted on (the API's route writes it with the change); a
    # refusal's row too, not the page's patient.
    request.state.audit_resource = ("alerts", alert_id)
    try:
        if action == "acknowledge":
            await alert_routes.acknowledge(alert_id, session.principal, db, request, body)
        elif action == "resolve":
            await alert_routes.resolve(alert_id, session.principal, db, request, body)
        else:
            snooze = therapy_page.snooze_body(hours, note, datetime.now(UTC))
            await alert_routes.snooze(alert_id, snooze, session.principal, db, request)
    except Problem as exc:
        if exc.status not in (409, 422):
            raise
        # Refused as things stand (the condition still holds, or it changed meanwhile; a
        # snooze beyond the contract's limits, or without a note): the page says why, beside
        # the alert.
        return await _patient(
            patient_id, session, db, request, refused={alert_id: exc.detail}, status=exc.status
        )
    return RedirectResponse(f"/patients/{patient_id}#alerts", status_code=303)


# --- fleet ---------------------------------------------------------------------------------------


@router.get("/fleet", tags=["pumps"])
async def fleet(request: Request, db: Db) -> Response:
    session = await _session(db, request)
    if session is None:
        return _to_login(request)
    if session.principal.role not in ("fleet", "admin"):
        return _page("missing.html", status=404, session=session)
    rows = [dict(r) for r in await db.fetch(sql.FLEET)]
    totals = {
        key: sum(r[key] for r in rows) for key in ("pumps", "reporting", "silent", "with_alarms")
    }
    # Messages lost for good, by pump (the pump state's ``unrecovered_gaps``), in UTC: the fleet
    # spans clinics and their time zones.
    gaps = [dict(r) for r in await db.fetch(sql.FLEET_UNRECOVERED_GAPS)]
    return _page("fleet.html", session=session, rows=rows, totals=totals, gaps=gaps, utc=UTC)
