"""Webhook registrations of a clinic (deliveries: the alert service's notification worker)."""

from __future__ import annotations

from uuid import UUID

from fastapi import APIRouter, Request, Response, status

from services.api import audit, models, sql
from services.api.auth import Principal, require
from services.api.common import (
    Auth,
    Cursor,
    Db,
    Limit,
    clinic_for_write,
    cursor_uuid,
    decode_cursor,
    encode_cursor,
    scope_of,
)
from services.api.problems import FieldError, Problem, not_found
from services.domain.webhook_urls import check_registration_url, new_secret

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


def _manager(principal: Principal) -> None:
    require(principal, "admin", "clinician", "integrator")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Register a webhook (clinician, integrator); the signing secret is shown once",
)
async def create_webhook(
    body: models.WebhookIn, principal: Auth, db: Db, request: Request, response: Response
) -> models.WebhookCreated:
    _manager(principal)
    clinic_id = clinic_for_write(principal, body.clinic_id)
    if not await db.fetchval(sql.CLINIC_EXISTS, clinic_id):
        raise not_found("clinic")
    allowed = request.app.state.settings.allowed_webhook_hosts()
    problem = check_registration_url(body.url, allowed)
    if problem is not None:
        raise Problem(
            422,
            f"url refused: {problem}",
            kind="validation",
            errors=[FieldError(field="body.url", message=problem)],
        )
    secret = new_secret()
    async with db.transaction():
        row = await db.fetchrow(
            sql.INSERT_WEBHOOK,
            clinic_id,
            body.url,
            sorted(set(body.events)),
            secret,
            principal.actor,
        )
        assert row is not None
        await audit.record(
            db,
            request,
            resource_type="webhooks",
            resource_id=row["id"],
            clinic_id=clinic_id,
            status=201,
        )
    response.headers["Location"] = f"/v1/webhooks/{row['id']}"
    return models.WebhookCreated(**dict(row), secret=secret)


@router.get("", summary="The clinic's webhooks (secrets are never shown again)")
async def list_webhooks(
    principal: Auth, db: Db, limit: Limit = 50, cursor: Cursor = None
) -> models.Page[models.WebhookOut]:
    _manager(principal)
    after = decode_cursor(cursor, 1)
    rows = await db.fetch(
        sql.LIST_WEBHOOKS,
        scope_of(principal),
        None if after is None else cursor_uuid(after[0]),
        limit + 1,
    )
    items = [models.WebhookOut(**dict(r)) for r in rows[:limit]]
    more = len(rows) > limit
    return models.Page(items=items, next_cursor=encode_cursor(items[-1].id) if more else None)


@router.post(
    "/{webhook_id}/rotate-secret",
    summary="A new signing secret (shown once); the old one keeps signing for the overlap",
)
async def rotate_secret(
    webhook_id: UUID,
    principal: Auth,
    db: Db,
    request: Request,
    body: models.RotateIn | None = None,
) -> models.WebhookCreated:
    _manager(principal)
    overlap = (body or models.RotateIn()).overlap_hours * 3600
    secret = new_secret()
    async with db.transaction():
        row = await db.fetchrow(
            sql.ROTATE_WEBHOOK_SECRET, webhook_id, scope_of(principal), secret, overlap
        )
        if row is None:
            raise not_found("webhook")
        await audit.record(
            db,
            request,
            resource_type="webhooks",
            resource_id=webhook_id,
            clinic_id=row["clinic_id"],
        )
    return models.WebhookCreated(**dict(row), secret=secret)


@router.delete(
    "/{webhook_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a webhook; pending deliveries to it stop",
    response_class=Response,
)
async def delete_webhook(webhook_id: UUID, principal: Auth, db: Db, request: Request) -> Response:
    _manager(principal)
    if principal.role == "fleet":
        raise not_found("webhook")
    async with db.transaction():
        found = await db.fetchrow(sql.DELETE_WEBHOOK, webhook_id, scope_of(principal))
        if found is None:
            raise not_found("webhook")
        await audit.record(
            db,
            request,
            resource_type="webhooks",
            resource_id=webhook_id,
            clinic_id=found["clinic_id"],
            status=204,
        )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
