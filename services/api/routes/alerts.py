"""Alerts: lists, one alert with its history and notifications, acknowledge, resolve."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Query, Request

from services.api import audit, models, sql, views
from services.api.auth import Principal, require
from services.api.common import (
    Auth,
    Cursor,
    Db,
    Limit,
    cursor_time,
    cursor_uuid,
    decode_cursor,
    encode_cursor,
    scope_of,
    visible,
)
from services.api.problems import FieldError, Problem, not_found
from services.api.settings import ApiSettings
from services.domain import conditions, rules
from services.domain.alerting import Finding
from services.storage import outbox
from services.storage.database import Connection

router = APIRouter(prefix="/v1/alerts", tags=["alerts"])


@router.get("", summary="Alerts, newest first (the fleet role sees them de-identified)")
async def list_alerts(
    principal: Auth,
    db: Db,
    status: Annotated[Literal["open", "acknowledged", "resolved"] | None, Query()] = None,
    priority: Annotated[Literal["high", "medium", "low"] | None, Query()] = None,
    serial: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9-]{4,32}$")] = None,
    patient_id: Annotated[UUID | None, Query()] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> models.Page[models.AlertOut]:
    if principal.role == "fleet" and patient_id is not None:
        raise Problem(403, "the fleet role cannot filter by patient", kind="forbidden")
    after = decode_cursor(cursor, 2)
    scope = scope_of(principal)
    rows = await db.fetch(
        sql.LIST_ALERTS if scope is None else sql.LIST_CLINIC_ALERTS,
        scope,
        status,
        priority,
        serial,
        patient_id,
        None if after is None else cursor_time(after[0]),
        None if after is None else cursor_uuid(after[1]),
        limit + 1,
    )
    items = [views.alert_out(r, principal) for r in rows[:limit]]
    more = len(rows) > limit
    return models.Page(
        items=items,
        next_cursor=encode_cursor(items[-1].opened_at.isoformat(), items[-1].id) if more else None,
    )


async def _alert(db: Connection, principal: Principal, alert_id: UUID) -> asyncpg.Record:
    row = await db.fetchrow(sql.ALERT, alert_id)
    if row is None:
        raise not_found("alert")
    visible(principal, row["clinic_id"], "alert")
    return row


async def _notifications(db: Connection, alert_id: UUID) -> list[dict[str, Any]]:
    if not await db.fetchval(sql.HAS_DELIVERIES):
        return []
    return [dict(r) for r in await db.fetch(sql.ALERT_DELIVERIES, alert_id)]


async def _detail(db: Connection, principal: Principal, row: asyncpg.Record) -> models.AlertDetail:
    history = [models.HistoryEntry(**dict(h)) for h in await db.fetch(sql.ALERT_HISTORY, row["id"])]
    return models.AlertDetail(
        **views.alert_out(row, principal).model_dump(),
        history=history,
        notifications=await _notifications(db, row["id"]),
    )


@router.get("/{alert_id}", summary="An alert with its history of state changes and notifications")
async def get_alert(alert_id: UUID, principal: Auth, db: Db) -> models.AlertDetail:
    if principal.role == "fleet":
        raise not_found("alert")
    return await _detail(db, principal, await _alert(db, principal, alert_id))


async def _change(
    db: Connection,
    principal: Principal,
    request: Request,
    alert_id: UUID,
    action: Literal["acknowledged", "resolved"],
    note: str | None,
) -> models.AlertDetail:
    require(principal, "clinician", "admin")
    before = await _alert(db, principal, alert_id)
    async with db.transaction():
        if action == "acknowledged":
            if before["status"] == "acknowledged":
                return await _detail(db, principal, before)  # idempotent
            if before["status"] == "resolved":
                raise Problem(409, "the alert is resolved; nothing to acknowledge", kind="conflict")
            row = await db.fetchrow(sql.ACKNOWLEDGE, alert_id, principal.actor)
        else:
            if before["status"] == "resolved":
                raise Problem(409, "the alert is already resolved", kind="conflict")
            holding = await _still_holding(db, before)
            if holding is not None:
                raise Problem(
                    409,
                    f"the condition still holds: {holding.title}. This alert resolves by itself "
                    "once the condition ends (a refill, a booked visit, readings that clear "
                    "it); meanwhile acknowledge it, or snooze its reminders.",
                    kind="condition-holds",
                )
            row = await db.fetchrow(sql.RESOLVE, alert_id, principal.actor, note)
        if row is None:  # changed under us (the engine, another clinician)
            raise Problem(409, "the alert changed meanwhile; read it again", kind="conflict")
        reason = note or f"{action} by {principal.name or principal.actor}"
        await db.execute(
            sql.INSERT_HISTORY,
            alert_id,
            principal.actor,
            action,
            before["status"],
            row["status"],
            row["priority"],
            reason,
        )
        payload = views.alert_out(row, principal).model_dump(mode="json") | {
            "actor": principal.actor_object,
            "note": note,
        }
        await outbox.add(
            db, f"alert.{action}", payload, alert_id=alert_id, clinic_id=row["clinic_id"]
        )
        await audit.record(
            db, request, resource_type="alerts", resource_id=alert_id, clinic_id=row["clinic_id"]
        )
    return await _detail(db, principal, row)


async def _still_holding(db: Connection, alert: asyncpg.Record) -> Finding | None:
    """The finding of the alert's condition if it holds now (the engine's rules on the pump's
    snapshot). A finding about one past event (a refill's discrepancy) is for a person to
    judge: resolving it is allowed."""
    snapshot = (await views.snapshots(db, [alert["serial"]])).get(alert["serial"])
    if snapshot is None:
        return None
    for finding in conditions.fold(rules.evaluate(snapshot)):
        if conditions.condition_of(finding.rule) == alert["condition"]:
            return None if finding.occurrence is not None else finding
    return None


@router.post("/{alert_id}/acknowledge", summary="Acknowledge (clinician); idempotent")
async def acknowledge(
    alert_id: UUID, principal: Auth, db: Db, request: Request, body: models.NoteIn | None = None
) -> models.AlertDetail:
    return await _change(
        db, principal, request, alert_id, "acknowledged", None if body is None else body.note
    )


@router.post("/{alert_id}/resolve", summary="Resolve (clinician), with an optional note")
async def resolve(
    alert_id: UUID, principal: Auth, db: Db, request: Request, body: models.NoteIn | None = None
) -> models.AlertDetail:
    return await _change(
        db, principal, request, alert_id, "resolved", None if body is None else body.note
    )


@router.post(
    "/{alert_id}/snooze",
    summary="Snooze the alert's reminders until a time, with a note (clinician)",
)
async def snooze(
    alert_id: UUID,
    body: models.SnoozeIn,
    principal: Auth,
    db: Db,
    request: Request,
) -> models.AlertDetail:
    """No re-notification (escalation of an unacknowledged high alert) until `until`: at most
    24 h ahead, 4 h for a high priority alert. The alert stays open or acknowledged and is
    never silenced: if its condition worsens it escalates, and the snooze ends."""
    require(principal, "clinician", "admin")
    settings: ApiSettings = request.app.state.settings
    before = await _alert(db, principal, alert_id)
    if before["status"] == "resolved":
        raise Problem(409, "the alert is resolved; nothing to snooze", kind="conflict")
    until = body.until
    if until.tzinfo is None:
        raise _until_problem("needs a UTC offset (RFC 3339)")
    now = datetime.now(UTC)
    high = before["priority"] == "high"
    hours = settings.api_snooze_high_max_hours if high else settings.api_snooze_max_hours
    if until <= now:
        raise _until_problem("must be in the future")
    if until > now + timedelta(hours=hours):
        raise _until_problem(f"at most {hours:g} h ahead for a {before['priority']} priority alert")
    async with db.transaction():
        row = await db.fetchrow(sql.SNOOZE, alert_id, until, principal.actor, body.note)
        if row is None:
            raise Problem(409, "the alert changed meanwhile; read it again", kind="conflict")
        await db.execute(
            sql.INSERT_HISTORY,
            alert_id,
            principal.actor,
            "snoozed",
            row["status"],
            row["status"],
            row["priority"],
            f"reminders snoozed until {until.astimezone(UTC).isoformat()}: {body.note}",
        )
        await audit.record(
            db, request, resource_type="alerts", resource_id=alert_id, clinic_id=row["clinic_id"]
        )
    return await _detail(db, principal, row)


def _until_problem(message: str) -> Problem:
    return Problem(
        422,
        f"until {message}",
        kind="validation",
        errors=[FieldError(field="body.until", message=message)],
    )
