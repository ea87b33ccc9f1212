"""Clinic settings: the clinic's alert thresholds (``GET/PUT /v1/clinics/{id}/alert-settings``)
and its notification routes (``GET/PUT /v1/clinics/{id}/notifications``) as forms, each field
with its name, unit and default; saved through the API's own route functions (the engine's
checks, the audit row naming the signed-in person), refusals in words."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from starlette.datastructures import FormData

from services.api import models
from services.api.common import Db
from services.api.problems import Problem
from services.api.routes import clinics as clinic_routes
from services.api.web.patients import field_errors
from services.api.web.settings import Place, place, posted_list, posted_place, posted_text, render
from services.domain.alerting import Rule, RuleSettings
from services.domain.notifications import ALERT_EVENTS, ALL_PRIORITIES, NotificationSettings

router = APIRouter(include_in_schema=False)

THRESHOLDS = (
    ("refill_due_low_days", "Refill due: low priority", "days"),
    ("refill_due_medium_days", "Refill due: medium priority", "days"),
    ("refill_due_high_days", "Refill due: high priority", "days"),
    ("silent_max_days", "Pump silent after at most", "days"),
)
THRESHOLD_HELP = {
    "refill_due_low_days": "A low-priority alert when the pump's effective refill deadline is "
    "this close and no visit is booked before it.",
    "refill_due_medium_days": "Medium priority when the deadline is this close.",
    "refill_due_high_days": "High priority when this close (a deadline set by the drug's age "
    "stays medium at most).",
    "silent_max_days": "A pump that sends nothing is silent after this long, or sooner: after "
    "half the time left to its low alarm.",
}
THRESHOLD_WORDS = {name: label for name, label, _ in THRESHOLDS} | {
    "disabled_rules": "Rules switched off"
}
RULES = tuple(r.value for r in Rule)
SPLIT = re.compile(r"[\s,;]+")


# --- alert thresholds ------------------------------------------------------------------------


async def _thresholds(
    db: Db,
    where: Place,
    *,
    form: dict[str, Any] | None = None,
    errors: list[str] | None = None,
    notice: str | None = None,
    status: int = 200,
) -> Response:
    if form is None:
        current = await clinic_routes.get_alert_settings(
            where.clinic_id, where.session.principal, db
        )
        form = {
            name: "" if getattr(current, name) is None else f"{getattr(current, name):g}"
            for name, _, _ in THRESHOLDS
        } | {"disabled_rules": [str(r) for r in current.disabled_rules or []]}
    defaults = RuleSettings()
    rows = [
        {
            "name": name,
            "label": label,
            "unit": unit,
            "default": f"{getattr(defaults, name):g}",
            "help": THRESHOLD_HELP[name],
        }
        for name, label, unit in THRESHOLDS
    ]
    return render(
        where,
        "alerts",
        "settings_alerts.html",
        status=status,
        rows=rows,
        rules=RULES,
        form=form,
        errors=errors or [],
        notice=notice,
    )


@router.get("/settings/alerts", tags=["settings"])
async def thresholds_page(request: Request, db: Db, clinic: str | None = None) -> Response:
    where = await place(db, request, clinic)
    if not isinstance(where, Place):
        return where
    return await _thresholds(db, where)


@router.post("/settings/alerts", tags=["settings"])
async def save_thresholds(request: Request, db: Db) -> Response:
    """The clinic's thresholds (empty: the default) and the rules it switched off."""
    posted, where = await posted_place(db, request)
    if not isinstance(where, Place):
        return where
    form: dict[str, Any] = {name: posted_text(posted, name) for name, _, _ in THRESHOLDS}
    form["disabled_rules"] = posted_list(posted, "disabled_rules")
    given = {k: v for k, v in form.items() if v not in ("", [])}
    try:
        body = models.ClinicAlertSettings.model_validate(given)
    except ValidationError as exc:
        errors = field_errors(exc, THRESHOLD_WORDS)
        return await _thresholds(db, where, form=form, errors=errors, status=422)
    try:
        await clinic_routes.put_alert_settings(
            where.clinic_id, body, where.session.principal, db, request
        )
    except Problem as exc:
        if exc.status not in (403, 404, 409, 422):
            raise
        return await _thresholds(db, where, form=form, errors=[exc.detail], status=exc.status)
    return await _thresholds(db, where, notice="The alert thresholds are saved.")


# --- notification routes -----------------------------------------------------------------------

NOTIFY_WORDS = {
    "email.high": "High-priority addresses",
    "email.medium": "Medium-priority addresses",
    "email.low": "Low-priority addresses",
    "email.events": "Emailed events",
    "webhook_priorities": "Priorities sent to webhooks",
    "mqtt_priorities": "Priorities published over MQTT",
    "admin_emails": "Admin contacts",
    "escalation.contacts": "Escalation contacts",
    "escalation.after_minutes": "Escalate after, minutes",
    "escalation.repeat_minutes": "Repeat every, minutes",
    "quiet_hours.start": "Quiet hours start",
    "quiet_hours.end": "Quiet hours end",
    "quiet_hours.channels": "Quiet channels",
    "quiet_hours": "Quiet hours",
    "digest.hour": "Digest hour",
    "digest.recipients": "Digest recipients",
    "digest.horizon_days": "Digest horizon, days",
}
LISTS = ("email_high", "email_medium", "email_low", "admin_emails", "escalation_contacts")
CHECKS = ("patient_names", "escalation_enabled", "quiet_enabled", "digest_enabled", "digest_fold")
MANY = ("email_events", "webhook_priorities", "mqtt_priorities", "quiet_channels")
NUMBERS = ("after_minutes", "repeat_minutes", "quiet_start", "quiet_end", "digest_hour")


def _view(now: NotificationSettings) -> dict[str, Any]:
    """The stored routes as the form shows them."""
    quiet = now.quiet_hours
    return {
        "email_high": "\n".join(now.email.high),
        "email_medium": "\n".join(now.email.medium),
        "email_low": "\n".join(now.email.low),
        "email_events": list(now.email.events),
        "patient_names": now.email.patient_names,
        "webhook_priorities": list(now.webhook_priorities),
        "mqtt_priorities": list(now.mqtt_priorities),
        "admin_emails": "\n".join(now.admin_emails),
        "escalation_enabled": now.escalation.enabled,
        "escalation_contacts": "\n".join(now.escalation.contacts),
        "after_minutes": f"{now.escalation.after_minutes:g}",
        "repeat_minutes": f"{now.escalation.repeat_minutes:g}",
        "quiet_enabled": quiet is not None,
        "quiet_start": "" if quiet is None else quiet.start.strftime("%H:%M"),
        "quiet_end": "" if quiet is None else quiet.end.strftime("%H:%M"),
        "quiet_channels": ["email"] if quiet is None else list(quiet.channels),
        "digest_enabled": now.digest.enabled,
        "digest_hour": str(now.digest.hour),
        "digest_recipients": "\n".join(now.digest.recipients or []),
        "digest_horizon": f"{now.digest.horizon_days:g}",
        "digest_fold": now.digest.fold_low_priority,
    }


def _posted(posted: FormData) -> dict[str, Any]:
    """The form as posted (shown again as typed when refused)."""
    form: dict[str, Any] = {name: posted_text(posted, name) for name in (*LISTS, *NUMBERS)}
    form |= {name: posted_text(posted, name) for name in ("digest_recipients", "digest_horizon")}
    form |= {name: posted_text(posted, name) == "on" for name in CHECKS}
    form |= {name: posted_list(posted, name) for name in MANY}
    return form


def _addresses(text: str) -> list[str]:
    return [a for a in SPLIT.split(text) if a]


def _settings(form: dict[str, Any]) -> dict[str, Any]:
    """The form as the API's ``NotificationSettings`` (empty numbers: the defaults)."""

    def numbers(**given: str) -> dict[str, str]:
        return {k: v for k, v in given.items() if v != ""}

    body: dict[str, Any] = {
        "email": {
            "high": _addresses(form["email_high"]),
            "medium": _addresses(form["email_medium"]),
            "low": _addresses(form["email_low"]),
            "events": form["email_events"],
            "patient_names": form["patient_names"],
        },
        "webhook_priorities": form["webhook_priorities"],
        "mqtt_priorities": form["mqtt_priorities"],
        "admin_emails": _addresses(form["admin_emails"]),
        "escalation": {
            "enabled": form["escalation_enabled"],
            "contacts": _addresses(form["escalation_contacts"]),
            **numbers(after_minutes=form["after_minutes"], repeat_minutes=form["repeat_minutes"]),
        },
        "digest": {
            "enabled": form["digest_enabled"],
            "fold_low_priority": form["digest_fold"],
            "recipients": _addresses(form["digest_recipients"]) or None,
            **numbers(hour=form["digest_hour"], horizon_days=form["digest_horizon"]),
        },
    }
    if form["quiet_enabled"]:
        body["quiet_hours"] = {
            "channels": form["quiet_channels"],
            **numbers(start=form["quiet_start"], end=form["quiet_end"]),
        }
    return body


def _notify_errors(exc: ValidationError) -> list[str]:
    """The model's errors as sentences naming the form's fields."""
    found = []
    for error in exc.errors():
        path = [str(p) for p in error["loc"]]
        label = "The form"
        for cut in range(len(path), 0, -1):
            if ".".join(path[:cut]) in NOTIFY_WORDS:
                label = NOTIFY_WORDS[".".join(path[:cut])]
                break
        if error["type"] == "missing":
            said = "required"
        elif error["type"] == "string_pattern_mismatch":
            said = f"“{error['input']}” is not an email address"
        else:
            said = str(error["msg"]).removeprefix("Value error, ")
        found.append(f"{label}: {said}")
    return found


async def _routes(
    db: Db,
    where: Place,
    *,
    form: dict[str, Any] | None = None,
    errors: list[str] | None = None,
    notice: str | None = None,
    status: int = 200,
) -> Response:
    if form is None:
        now = await clinic_routes.get_notifications(where.clinic_id, where.session.principal, db)
        form = _view(now)
    return render(
        where,
        "notifications",
        "settings_notifications.html",
        status=status,
        form=form,
        defaults=NotificationSettings(),
        events=sorted(ALERT_EVENTS),
        priorities=ALL_PRIORITIES,
        channels=("email", "webhook", "mqtt"),
        errors=errors or [],
        notice=notice,
    )


@router.get("/settings/notifications", tags=["settings"])
async def routes_page(request: Request, db: Db, clinic: str | None = None) -> Response:
    where = await place(db, request, clinic)
    if not isinstance(where, Place):
        return where
    return await _routes(db, where)


@router.post("/settings/notifications", tags=["settings"])
async def save_routes(request: Request, db: Db) -> Response:
    """Recipients by priority, escalation, quiet hours and the digest, as the API defines them."""
    posted, where = await posted_place(db, request)
    if not isinstance(where, Place):
        return where
    form = _posted(posted)
    try:
        body = NotificationSettings.model_validate(_settings(form))
    except ValidationError as exc:
        return await _routes(db, where, form=form, errors=_notify_errors(exc), status=422)
    try:
        await clinic_routes.put_notifications(
            where.clinic_id, body, where.session.principal, db, request
        )
    except Problem as exc:
        if exc.status not in (403, 404, 409, 422):
            raise
        return await _routes(db, where, form=form, errors=[exc.detail], status=exc.status)
    return await _routes(db, where, notice="The notification routes are saved.")
