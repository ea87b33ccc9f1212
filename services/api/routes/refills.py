"""Refills recorded over HTTP (the MQTT ``refill`` event's path: the contract's checks, the dedup
ledger, the events table, a NOTIFY for the alert engine) and the refill history."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from fastapi import APIRouter, Request, Response, status

from services.api import audit, models, sql, views
from services.api.auth import Principal, require
from services.api.common import (
    Auth,
    Cursor,
    Db,
    Limit,
    cursor_time,
    decode_cursor,
    encode_cursor,
    scope_of,
)
from services.api.problems import FieldError, Problem, not_found
from services.api.routes.pumps import Serial, pump_clinic
from services.domain import contract, rules
from services.domain.alerting import RuleSettings
from services.storage import channels, outbox
from services.storage.database import Connection

router = APIRouter(tags=["refills"])

_MAX_FUTURE = timedelta(minutes=5)
_OLDEST = datetime(2000, 1, 1, tzinfo=UTC)
_SOURCE_KIND = "http_api"


def _document(serial: str, body: models.RefillIn, msg_id: uuid.UUID, at: datetime) -> bytes:
    refill = body.refill.model_dump(exclude_none=True)
    doc = {
        "v": 1,
        "msg_id": str(msg_id),
        "serial": serial,
        "recorded_at": at.isoformat(),
        "type": "refill",
        "refill": refill,
    }
    return json.dumps(doc, allow_nan=False).encode()


def _contract_refused(exc: contract.Rejected) -> Problem:
    return Problem(
        422,
        f"the refill breaks the event contract ({exc.reason}): {exc.detail}",
        kind="validation",
        errors=[FieldError(field="body", message=f"{exc.reason}: {exc.detail}")],
    )


@router.post(
    "/v1/pumps/{serial}/refills",
    status_code=status.HTTP_201_CREATED,
    summary="Record a refill (admin, clinician); returns the computed discrepancy",
    responses={200: {"description": "Already recorded (same `msg_id`): the stored refill"}},
)
async def record_refill(
    serial: Serial,
    body: models.RefillIn,
    principal: Auth,
    db: Db,
    request: Request,
    response: Response,
) -> models.RefillOut:
    require(principal, "admin", "clinician")
    clinic_id = await pump_clinic(db, principal, serial)
    if body.serial is not None and body.serial != serial:
        raise Problem(
            422,
            f"serial {body.serial!r} does not match the path's {serial!r}",
            kind="validation",
            errors=[FieldError(field="body.serial", message="must equal the path's serial")],
        )
    now = datetime.now(UTC)
    at = body.recorded_at or now
    if at.tzinfo is None:
        raise Problem(
            422,
            "recorded_at needs a UTC offset",
            kind="validation",
            errors=[FieldError(field="body.recorded_at", message="RFC 3339 with an offset")],
        )
    msg_id = body.msg_id or uuid.uuid4()
    raw = _document(serial, body, msg_id, at)
    try:
        message = contract.decode("events", raw)
        contract.check(
            message, topic_serial=serial, now=now, max_future=_MAX_FUTURE, oldest=_OLDEST
        )
    except contract.Rejected as exc:
        raise _contract_refused(exc) from exc
    assert isinstance(message, contract.RefillEvent)
    refill_body: dict[str, Any] = msgspec.to_builtins(message.refill)
    async with db.transaction():
        stored = await db.fetchval(
            sql.STORE_EVENT,
            msg_id,
            serial,
            "refill",
            message.recorded_at,
            _SOURCE_KIND,
            principal.actor,
            refill_body,
            raw.decode(),
        )
        if stored is None:
            existing = await db.fetchrow(sql.EVENT, msg_id)
            if existing is None or existing["serial"] != serial or existing["type"] != "refill":
                raise Problem(
                    409, f"msg_id {msg_id} is already used by another message", kind="conflict"
                )
            response.status_code = status.HTTP_200_OK
            recorded_at = existing["recorded_at"]  # the stored one, not this request's default
        else:
            await channels.pumps_changed(db, [serial])
            recorded_at = message.recorded_at
        # In the same transaction: the refill, its reconciliation and its event commit together
        # or not at all (a refusal here, or a lost connection, leaves nothing half-recorded).
        result = await _reconciled(db, serial, recorded_at)
        result.msg_id = msg_id
        if stored is not None:
            await outbox.add(
                db,
                "refill.recorded",
                result.model_dump(mode="json") | {"recorded_by": principal.actor_object},
                clinic_id=clinic_id,
            )
            await audit.record(
                db,
                request,
                resource_type="refills",
                resource_id=msg_id,
                clinic_id=clinic_id,
                status=201,
            )
    return result


async def _reconciled(db: Db, serial: str, at: datetime) -> models.RefillOut:
    """The refill at ``at`` reconciled as of that moment: it and the refill before it."""
    upto = at + timedelta(microseconds=1)
    found = (await views.snapshots(db, [serial], now=upto, refills=2)).get(serial)
    if found is None:
        raise not_found("pump")
    for pair in reversed(rules.reconciliations(found)):
        if pair[0].recorded_at == at:
            return views.refill_out(serial, pair, found.settings)
    raise Problem(409, "the refill was stored but is not among the pump's refills", kind="conflict")


@router.get(
    "/v1/pumps/{serial}/refills",
    summary="Refill history, newest first, with expected vs actual residual and discrepancy",
)
async def list_refills(
    serial: Serial, principal: Auth, db: Db, limit: Limit = 50, cursor: Cursor = None
) -> models.Page[models.RefillOut]:
    await pump_clinic(db, principal, serial, history=True)
    after = decode_cursor(cursor, 1)
    before = None if after is None else cursor_time(after[0])
    items, following = await refill_page(db, principal, serial, before, limit)
    return models.Page(
        items=items, next_cursor=None if following is None else encode_cursor(following)
    )


async def refill_page(
    db: Connection, principal: Principal, serial: str, before: datetime | None, limit: int
) -> tuple[list[models.RefillOut], datetime | None]:
    """Up to ``limit`` refills recorded before ``before`` (None: any), newest first, each
    reconciled with the one before it, in the periods the principal's clinic held the pump;
    and where the next page begins (None: this is the last)."""
    times = await db.fetch(sql.REFILL_TIMES, serial, before, limit + 1, scope_of(principal))
    if not times:
        return [], None
    page_times = [r["recorded_at"] for r in times[:limit]]
    # The page's refills and the one before the oldest of them (its expectation).
    upto = page_times[0] + timedelta(microseconds=1)
    found = (await views.snapshots(db, [serial], now=upto, refills=len(page_times) + 1)).get(serial)
    if found is None:
        raise not_found("pump")
    settings = found.settings or RuleSettings()
    wanted = set(page_times)
    items = [
        views.refill_out(serial, pair, settings)
        for pair in reversed(rules.reconciliations(found))
        if pair[0].recorded_at in wanted
    ]
    return items, page_times[-1] if len(times) > limit else None
