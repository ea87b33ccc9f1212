"""Clinic settings: the clinic's webhooks (``/v1/webhooks``): list, add (the signing secret is
shown once), rotate the secret (shown once; the old one keeps signing for the overlap) and
delete — each through the API's own route function with the signed-in person's principal."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from services.api import models
from services.api.common import Db
from services.api.problems import Problem
from services.api.routes import webhooks as webhook_routes
from services.api.web.patients import field_errors
from services.api.web.routes import _zone
from services.api.web.settings import Place, place, posted_list, posted_place, posted_text, render
from services.domain.notifications import WEBHOOK_EVENTS

router = APIRouter(include_in_schema=False)

EVENTS = tuple(sorted(WEBHOOK_EVENTS))
HOOK_WORDS = {"url": "URL", "events": "Events", "overlap_hours": "Overlap"}


async def _hooks(
    db: Db,
    where: Place,
    *,
    form: dict[str, Any] | None = None,
    errors: list[str] | None = None,
    secret: models.WebhookCreated | None = None,
    shown_as: str = "",
    notice: str | None = None,
    status: int = 200,
) -> Response:
    hooks = await _listed(db, where)
    return render(
        where,
        "webhooks",
        "settings_webhooks.html",
        status=status,
        hooks=hooks,
        events=EVENTS,
        form=form or {"url": "", "events": ["alert.opened", "alert.escalated"]},
        errors=errors or [],
        secret=secret,
        shown_as=shown_as,
        notice=notice,
        tz=await _zone(db, where.clinic_id),
    )


@router.get("/settings/webhooks", tags=["settings"])
async def hooks_page(request: Request, db: Db, clinic: str | None = None) -> Response:
    where = await place(db, request, clinic)
    if not isinstance(where, Place):
        return where
    return await _hooks(db, where)


def _refused(exc: Problem) -> str:
    if exc.status == 404:
        return "No such webhook in this clinic (it may have been deleted)."
    return exc.detail


@router.post("/settings/webhooks", tags=["settings"])
async def add_hook(request: Request, db: Db) -> Response:
    """Register a webhook for the clinic; its signing secret is shown this once."""
    posted, where = await posted_place(db, request)
    if not isinstance(where, Place):
        return where
    form: dict[str, Any] = {
        "url": posted_text(posted, "url"),
        "events": posted_list(posted, "events"),
    }
    given: dict[str, Any] = {"url": form["url"], "events": form["events"]}
    if where.admin:
        given["clinic_id"] = str(where.clinic_id)
    try:
        body = models.WebhookIn.model_validate(given)
    except ValidationError as exc:
        words = field_errors(exc, HOOK_WORDS)
        return await _hooks(db, where, form=form, errors=words, status=422)
    try:
        created = await webhook_routes.create_webhook(
            body, where.session.principal, db, request, Response()
        )
    except Problem as exc:
        if exc.status not in (403, 404, 409, 422):
            raise
        return await _hooks(db, where, form=form, errors=[_refused(exc)], status=exc.status)
    return await _hooks(db, where, secret=created, shown_as="added")


@router.post("/settings/webhooks/{webhook_id}/rotate", tags=["settings"])
async def rotate_hook(request: Request, db: Db, webhook_id: UUID) -> Response:
    """A new signing secret, shown once; the old one keeps signing for the overlap (hours)."""
    posted, where = await posted_place(db, request)
    if not isinstance(where, Place):
        return where
    overlap = posted_text(posted, "overlap_hours") or "24"
    try:
        body = models.RotateIn.model_validate({"overlap_hours": overlap})
    except ValidationError as exc:
        return await _hooks(db, where, errors=field_errors(exc, HOOK_WORDS), status=422)
    try:
        if not any(h.id == webhook_id for h in await _listed(db, where)):
            raise Problem(404, "webhook not found", kind="not-found")
        rotated = await webhook_routes.rotate_secret(
            webhook_id, where.session.principal, db, request, body
        )
    except Problem as exc:
        if exc.status not in (403, 404, 409, 422):
            raise
        return await _hooks(db, where, errors=[_refused(exc)], status=exc.status)
    return await _hooks(db, where, secret=rotated, shown_as="rotated")


@router.post("/settings/webhooks/{webhook_id}/delete", tags=["settings"])
async def delete_hook(request: Request, db: Db, webhook_id: UUID) -> Response:
    """Delete a webhook; pending deliveries to it stop."""
    _, where = await posted_place(db, request)
    if not isinstance(where, Place):
        return where
    try:
        hooks = await _listed(db, where)
        hook = next((h for h in hooks if h.id == webhook_id), None)
        if hook is None:
            raise Problem(404, "webhook not found", kind="not-found")
        await webhook_routes.delete_webhook(webhook_id, where.session.principal, db, request)
    except Problem as exc:
        if exc.status not in (403, 404, 409, 422):
            raise
        return await _hooks(db, where, errors=[_refused(exc)], status=exc.status)
    return await _hooks(db, where, notice=f"The webhook to {hook.url} is deleted.")


async def _listed(db: Db, where: Place) -> list[models.WebhookOut]:
    """The chosen clinic's webhooks (an administrator's form acts only on that clinic's)."""
    found: list[models.WebhookOut] = []
    cursor = None
    while True:
        page = await webhook_routes.list_webhooks(
            where.session.principal, db, limit=200, cursor=cursor
        )
        found.extend(h for h in page.items if h.clinic_id == where.clinic_id)
        cursor = page.next_cursor
        if cursor is None:
            return found
