"""Clinics, their API keys and their alert settings."""

from __future__ import annotations

from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Request, status

from services.api import audit, keys, models, sql
from services.api.auth import require
from services.api.common import (
    Auth,
    Cursor,
    Db,
    Limit,
    cursor_uuid,
    decode_cursor,
    encode_cursor,
    scope_of,
    visible,
)
from services.api.problems import FieldError, Problem, not_found
from services.domain.alerting import RuleSettings
from services.domain.notifications import NotificationSettings

router = APIRouter(prefix="/v1/clinics", tags=["clinics"])


def _zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise Problem(
            422,
            f"timezone {name!r} is not an IANA zone",
            kind="validation",
            errors=[FieldError(field="body.timezone", message="not an IANA time zone")],
        ) from exc
    return name


def _alert_settings(given: models.ClinicAlertSettings | None) -> dict[str, Any]:
    overrides = {} if given is None else given.model_dump(mode="json", exclude_none=True)
    try:
        RuleSettings().for_clinic(overrides)  # the engine must accept them
    except ValueError as exc:
        raise Problem(
            422,
            f"alert settings refused: {exc}",
            kind="validation",
            errors=[FieldError(field="body.alert_settings", message=str(exc)[:300])],
        ) from exc
    return overrides


def _clinic(row: Any) -> models.Clinic:
    return models.Clinic(**{k: row[k] for k in models.Clinic.model_fields})


@router.post("", status_code=status.HTTP_201_CREATED, summary="Create a clinic (admin)")
async def create_clinic(
    body: models.ClinicIn, principal: Auth, db: Db, request: Request
) -> models.Clinic:
    require(principal, "admin")
    async with db.transaction():
        row = await db.fetchrow(
            sql.INSERT_CLINIC, body.name, _zone(body.timezone), _alert_settings(body.alert_settings)
        )
        assert row is not None
        await audit.record(
            db,
            request,
            resource_type="clinics",
            resource_id=row["id"],
            clinic_id=row["id"],
            status=201,
        )
    return _clinic(row)


@router.get(
    "", summary="Clinics by name: every one for admin keys, a clinic key's own; none for fleet"
)
async def list_clinics(
    principal: Auth, db: Db, limit: Limit = 50, cursor: Cursor = None
) -> models.Page[models.Clinic]:
    if principal.role == "fleet":
        return models.Page(items=[], next_cursor=None)  # device teams work without clinics
    after = decode_cursor(cursor, 2)
    rows = await db.fetch(
        sql.LIST_CLINICS,
        scope_of(principal),
        None if after is None else after[0],
        None if after is None else cursor_uuid(after[1]),
        limit + 1,
    )
    items = [_clinic(r) for r in rows[:limit]]
    more = len(rows) > limit
    return models.Page(
        items=items, next_cursor=encode_cursor(items[-1].name, items[-1].id) if more else None
    )


@router.get("/{clinic_id}", summary="A clinic (admin, or a key of that clinic)")
async def get_clinic(clinic_id: UUID, principal: Auth, db: Db) -> models.Clinic:
    if principal.role == "fleet":
        raise not_found("clinic")
    visible(principal, clinic_id, "clinic")
    row = await db.fetchrow(sql.CLINIC, clinic_id)
    if row is None:
        raise not_found("clinic")
    return _clinic(row)


@router.post(
    "/{clinic_id}/keys",
    status_code=status.HTTP_201_CREATED,
    summary="Create an API key for the clinic (admin); the key is shown once",
)
async def create_key(
    clinic_id: UUID, body: models.KeyIn, principal: Auth, db: Db, request: Request
) -> models.KeyCreated:
    require(principal, "admin")
    if not await db.fetchval(sql.CLINIC_EXISTS, clinic_id):
        raise not_found("clinic")
    scoped = body.role in keys.CLINIC_ROLES
    async with db.transaction():
        key_id, key = await keys.create(
            db,
            role=body.role,
            clinic_id=clinic_id if scoped else None,
            label=body.label,
            created_by=principal.actor,
        )
        await audit.record(
            db,
            request,
            resource_type="keys",
            resource_id=key_id,
            clinic_id=clinic_id,
            status=201,
        )
    return models.KeyCreated(
        id=key_id, key=key, role=body.role, clinic_id=clinic_id if scoped else None
    )


@router.get("/{clinic_id}/alert-settings", summary="The clinic's alert thresholds")
async def get_alert_settings(
    clinic_id: UUID, principal: Auth, db: Db
) -> models.ClinicAlertSettings:
    if principal.role == "fleet":
        raise not_found("clinic")
    visible(principal, clinic_id, "clinic")
    row = await db.fetchrow(sql.CLINIC, clinic_id)
    if row is None:
        raise not_found("clinic")
    return models.ClinicAlertSettings(**row["alert_settings"])


@router.put(
    "/{clinic_id}/alert-settings",
    summary="Set the clinic's alert thresholds (admin, clinician); omitted ones use the defaults",
)
async def put_alert_settings(
    clinic_id: UUID, body: models.ClinicAlertSettings, principal: Auth, db: Db, request: Request
) -> models.ClinicAlertSettings:
    require(principal, "admin", "clinician")
    visible(principal, clinic_id, "clinic")
    async with db.transaction():
        row = await db.fetchrow(sql.UPDATE_ALERT_SETTINGS, clinic_id, _alert_settings(body))
        if row is None:
            raise not_found("clinic")
        await audit.record(
            db, request, resource_type="clinics", resource_id=clinic_id, clinic_id=clinic_id
        )
    return models.ClinicAlertSettings(**row["alert_settings"])


@router.get(
    "/{clinic_id}/notifications",
    summary="How the clinic is notified: recipients by priority, escalation, quiet hours, digest",
)
async def get_notifications(clinic_id: UUID, principal: Auth, db: Db) -> NotificationSettings:
    if principal.role == "fleet":
        raise not_found("clinic")
    visible(principal, clinic_id, "clinic")
    stored = await db.fetchval(sql.NOTIFICATION_SETTINGS, clinic_id)
    if stored is None:
        raise not_found("clinic")
    return NotificationSettings.stored(stored)


@router.put(
    "/{clinic_id}/notifications",
    summary="Set the clinic's notification routing (admin, clinician); `{}` restores defaults",
)
async def put_notifications(
    clinic_id: UUID, body: NotificationSettings, principal: Auth, db: Db, request: Request
) -> NotificationSettings:
    require(principal, "admin", "clinician")
    visible(principal, clinic_id, "clinic")
    async with db.transaction():
        stored = await db.fetchval(
            sql.UPDATE_NOTIFICATION_SETTINGS,
            clinic_id,
            body.model_dump(mode="json", exclude_defaults=True),
        )
        if stored is None:
            raise not_found("clinic")
        await audit.record(
            db, request, resource_type="clinics", resource_id=clinic_id, clinic_id=clinic_id
        )
    return NotificationSettings.stored(stored)
