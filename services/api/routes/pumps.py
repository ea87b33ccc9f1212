"""Pumps: registration, latest state with forecast, telemetry, the booked refill visit, and the
refill worklist."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Path, Query, Request, Response

from services.api import audit, custody, models, sql, views, worklist
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
from services.storage import channels
from services.storage.database import Connection

router = APIRouter(tags=["pumps"])

Serial = Annotated[
    str,
    Path(
        pattern=r"^[A-Za-z0-9-]{4,32}$",
        description="The pump's serial number",
        examples=["NGP204519H"],
    ),
]


async def pump_clinic(
    db: Connection, principal: Principal, serial: str, *, history: bool = False
) -> Any:
    """The pump's clinic (None: nobody's), 404 if the principal may not see it: its holder's
    now, or with ``history`` also a clinic that held it before (for the periods it did)."""
    row = await db.fetchrow(sql.PUMP_CLINIC, serial)
    if row is None:
        raise not_found("pump")
    past_holder = (
        history
        and not principal.sees(row["clinic_id"])
        and principal.clinic_id is not None
        and await db.fetchval(sql.HELD_EVER, serial, principal.clinic_id)
    )
    if not past_holder:
        visible(principal, row["clinic_id"], "pump")
    return row["clinic_id"]


def reading_out(row: asyncpg.Record) -> models.ReadingOut:
    return models.ReadingOut(
        msg_id=row["msg_id"],
        recorded_at=row["recorded_at"],
        received_at=row["received_at"],
        volume_ml=row["volume_ml"],
        capacity_ml=row["capacity_ml"],
        low_alarm_ml=row["low_alarm_ml"],
        basis=row["basis"],
        drug_name=row["drug_name"],
        concentration_mcg_per_ml=row["concentration_mcg_per_ml"],
        infusion_mode=row["infusion_mode"],
        rate_ml_per_day=row["rate_ml_per_day"],
        daily_dose_mcg=row["daily_dose_mcg"],
        measured_flow_ml_per_day=row["measured_flow_ml_per_day"],
        battery_pct=row["battery_pct"],
        battery_status=row["battery_status"],
        alarms=list(row["alarms"] or ()),
        seq=row.get("seq"),
        source_kind=row.get("source_kind"),
        source_id=row.get("source_id"),
    )


@router.put(
    "/v1/pumps/{serial}",
    summary="Custody: provision (admin, fleet), claim, assign or move a pump (clinician)",
    responses={
        201: {"description": "Provisioned (a serial never seen before)"},
        200: {"description": "Custody changed or confirmed"},
    },
)
async def put_pump(
    serial: Serial,
    body: models.PumpIn,
    principal: Auth,
    db: Db,
    request: Request,
    response: Response,
) -> models.PumpState:
    """Admin and fleet keys provision a pump to a clinic (and patient). A clinician assigns or
    moves a pump their clinic holds, or claims one nobody holds with the code its programmer
    shows (`claim_code`): without either, 403 and nothing changes; a pump another clinic
    holds answers 404. The pump's unresolved alerts follow it at once (history, and an
    `alert.assigned` event for the new holder)."""
    require(principal, "admin", "fleet", "clinician")
    settings: ApiSettings = request.app.state.settings
    now = datetime.now(UTC)
    if principal.all_clinics:
        clinic_id, patient_id = await _provisioned(db, body)
        how = "provisioned"
        claim = None
    else:
        clinic_id, patient_id, how, claim = await _clinician_custody(
            db, principal, serial, body, settings, now
        )
    async with db.transaction():
        before = await db.fetchrow(sql.PUMP_FOR_CUSTODY, serial)
        if (
            claim is not None
            and await db.fetchval(sql.USE_CLAIM, claim, serial, now, clinic_id, principal.actor)
            is None
        ):
            raise Problem(409, "the claim code was used meanwhile", kind="conflict")
        await db.execute(sql.CUSTODY_CHANGE, principal.actor, how)
        created = await db.fetchval(
            sql.UPSERT_PUMP, serial, body.model, clinic_id, patient_id, body.implanted_on
        )
        if before is None or (before["clinic_id"], before["patient_id"]) != (
            clinic_id,
            patient_id,
        ):
            await custody.hand_over(
                db,
                serial,
                clinic_id=clinic_id,
                patient_id=patient_id,
                clinic_changed=before is None or before["clinic_id"] != clinic_id,
                actor=principal.actor,
                how=how,
            )
        await channels.pumps_changed(db, [serial])
        await audit.record(
            db,
            request,
            resource_type="pumps",
            resource_id=serial,
            clinic_id=clinic_id,
            status=201 if created else 200,
        )
    response.status_code = 201 if created else 200
    return await _state(db, principal, serial)


async def _provisioned(db: Connection, body: models.PumpIn) -> tuple[UUID | None, UUID | None]:
    """Admin and fleet: the clinic and patient given (the patient's clinic if only it is)."""
    clinic_id = body.clinic_id
    if body.patient_id is not None:
        patient = await db.fetchrow(sql.PATIENT, body.patient_id)
        if patient is None:
            raise _field_problem("body.patient_id", "no such patient")
        if clinic_id is None:
            clinic_id = patient["clinic_id"]
        elif patient["clinic_id"] != clinic_id:
            raise _field_problem("body.patient_id", "not a patient of the clinic given")
    if clinic_id is not None and not await db.fetchval(sql.CLINIC_EXISTS, clinic_id):
        raise _field_problem("body.clinic_id", "no such clinic")
    return clinic_id, body.patient_id


async def _clinician_custody(
    db: Connection,
    principal: Principal,
    serial: str,
    body: models.PumpIn,
    settings: ApiSettings,
    now: datetime,
) -> tuple[UUID, UUID | None, str, UUID | None]:
    """A clinician's change: (clinic, patient, how, the claim event used or None)."""
    own = principal.clinic_id
    assert own is not None
    if body.clinic_id is not None and body.clinic_id != own:
        raise not_found("clinic")
    if body.patient_id is not None:
        patient = await db.fetchrow(sql.PATIENT, body.patient_id)
        if patient is None or patient["clinic_id"] != own:
            raise _field_problem("body.patient_id", "no such patient")
    current = await db.fetchrow(sql.PUMP_CLINIC, serial)
    if current is not None and current["clinic_id"] == own:
        if body.patient_id is None:
            raise _field_problem(
                "body.patient_id", "required: only an administrator may take a pump from a patient"
            )
        how = "assigned" if current["patient_id"] is None else "moved"
        return own, body.patient_id, how, None
    if current is not None and current["clinic_id"] is not None:
        raise not_found("pump")  # another clinic's, exactly as one that does not exist
    if body.claim_code is None:
        raise Problem(
            403,
            "this pump is not your clinic's: enter the claim code its programmer shows "
            "(claim_code), or ask an administrator to provision it to your clinic"
            if current is not None
            else "no pump with this serial has reported yet: once it has, a clinic claims it "
            "with the claim code its programmer shows, or an administrator provisions it",
            kind="custody",
        )
    claim = await _claim(db, principal, serial, body.claim_code, settings, now)
    return own, body.patient_id, "claimed", claim


async def _claim(
    db: Connection,
    principal: Principal,
    serial: str,
    code: str,
    settings: ApiSettings,
    now: datetime,
) -> UUID:
    """The claim event whose code this is (unexpired, unused), or 403; 429 after too many
    wrong codes for the pump. A wrong code is counted in its own transaction, so the refusal
    cannot undo it."""
    window = settings.api_claim_failure_window_s
    if (
        await db.fetchval(sql.CLAIM_FAILURES, serial, now, window)
        >= settings.api_claim_max_failures
    ):
        raise Problem(
            429,
            f"too many wrong claim codes for this pump: try again in {window / 60:g} minutes",
            kind="too-many-claims",
            headers={"Retry-After": str(int(window))},
        )
    found = await db.fetchval(sql.VALID_CLAIM, serial, code.upper(), now)
    if found is None:
        await db.execute(
            sql.INSERT_CLAIM_FAILURE, serial, now, principal.clinic_id, principal.actor
        )
        raise Problem(
            403,
            "the claim code does not match a code this pump's programmer showed, or it expired "
            "or was used: read the code from the programmer again",
            kind="custody",
        )
    claim: UUID = found
    return claim


def _field_problem(field: str, message: str) -> Problem:
    return Problem(
        422, message, kind="validation", errors=[FieldError(field=field, message=message)]
    )


async def _state(db: Connection, principal: Principal, serial: str) -> models.PumpState:
    now = datetime.now(UTC)
    row = await db.fetchrow(sql.PUMP_STATE, serial, now)
    if row is None:
        raise not_found("pump")
    return (await views.pump_states(db, [row], principal, now))[0]


@router.get(
    "/v1/pumps",
    summary="Pumps by serial with their latest state: a clinic's own; every pump for admin and "
    "fleet keys (fleet: without patients)",
)
async def list_pumps(
    principal: Auth,
    db: Db,
    patient_id: Annotated[
        UUID | None, Query(description="Only the pump of this patient (not for the fleet role)")
    ] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> models.Page[models.PumpState]:
    """The pumps the key's clinic holds now (admin and fleet keys: every pump, those nobody
    holds included), each with the state `GET /v1/pumps/{serial}` answers. The fleet role sees
    no patients, so it cannot filter by one (403)."""
    if patient_id is not None and not principal.identified:
        raise Problem(403, "the fleet role sees no patients", kind="forbidden")
    after = decode_cursor(cursor, 1)
    serial = (after or [None])[0] or ""
    scope, now = scope_of(principal), datetime.now(UTC)
    if patient_id is not None:
        rows = await db.fetch(sql.LIST_PATIENT_PUMPS, patient_id, scope, serial, limit + 1, now)
    elif scope is not None:
        rows = await db.fetch(sql.LIST_CLINIC_PUMPS, scope, serial, limit + 1, now)
    else:
        rows = await db.fetch(sql.LIST_ALL_PUMPS, serial, limit + 1, now)
    items = await views.pump_states(db, rows[:limit], principal, now)
    more = len(rows) > limit
    return models.Page(items=items, next_cursor=encode_cursor(items[-1].serial) if more else None)


@router.get("/v1/pumps/{serial}", summary="Latest state: reservoir, therapy, battery, forecast")
async def get_pump(serial: Serial, principal: Auth, db: Db) -> models.PumpState:
    await pump_clinic(db, principal, serial)
    return await _state(db, principal, serial)


@router.get(
    "/v1/pumps/{serial}/telemetry",
    tags=["telemetry"],
    summary="Readings, newest first; `bucket=1h` returns hourly averages",
    # Serialised here, each branch by its own model: a union response model would make
    # FastAPI try every bucket as a reading first.
    response_model=None,
    responses={
        200: {
            "description": "A page of readings, or of hourly buckets with `bucket=1h`",
            "model": models.Page[models.ReadingOut] | models.Page[models.Bucket],
        }
    },
)
async def telemetry(
    serial: Serial,
    principal: Auth,
    db: Db,
    since: Annotated[datetime | None, Query(description="From (inclusive), RFC 3339")] = None,
    until: Annotated[datetime | None, Query(description="To (exclusive), RFC 3339")] = None,
    bucket: Annotated[Literal["1h"] | None, Query(description="`1h`: hourly averages")] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Response:
    await pump_clinic(db, principal, serial, history=True)
    low = _utc(since, "since") if since else datetime(1970, 1, 1, tzinfo=UTC)
    high = _utc(until, "until") if until else datetime.now(UTC) + timedelta(days=1)
    if high <= low:
        raise Problem(
            422,
            "until must be after since",
            kind="validation",
            errors=[FieldError(field="query.until", message="must be after since")],
        )
    if bucket == "1h":
        after = decode_cursor(cursor, 1)
        before = None if after is None else cursor_time(after[0])
        rows = await db.fetch(sql.HOURLY, serial, low, high, before, limit + 1, scope_of(principal))
        buckets = [models.Bucket(**dict(r)) for r in rows[:limit]]
        more = len(rows) > limit
        found = models.Page[models.Bucket](
            items=buckets, next_cursor=encode_cursor(buckets[-1].hour) if more else None
        )
        return Response(found.model_dump_json(), media_type="application/json")
    after = decode_cursor(cursor, 2)
    rows = await db.fetch(
        sql.READINGS,
        serial,
        low,
        high,
        None if after is None else cursor_time(after[0]),
        None if after is None else cursor_uuid(after[1]),
        limit + 1,
        scope_of(principal),
    )
    readings = [reading_out(r) for r in rows[:limit]]
    more = len(rows) > limit
    page = models.Page[models.ReadingOut](
        items=readings,
        next_cursor=encode_cursor(readings[-1].recorded_at, readings[-1].msg_id) if more else None,
    )
    return Response(page.model_dump_json(), media_type="application/json")


def _utc(value: datetime, field: str) -> datetime:
    if value.tzinfo is None:
        raise Problem(
            422,
            f"{field} needs a UTC offset",
            kind="validation",
            errors=[FieldError(field=f"query.{field}", message="RFC 3339 with an offset")],
        )
    return value.astimezone(UTC)


@router.put(
    "/v1/pumps/{serial}/refill-appointment",
    summary="Book (or clear, with null) the refill visit (admin, clinician)",
)
async def put_appointment(
    serial: Serial, body: models.AppointmentIn, principal: Auth, db: Db, request: Request
) -> models.PumpState:
    require(principal, "admin", "clinician")
    clinic_id = await pump_clinic(db, principal, serial)
    at = None if body.scheduled_for is None else _body_utc(body.scheduled_for)
    async with db.transaction():
        await db.execute(sql.SET_APPOINTMENT, serial, at)
        await channels.pumps_changed(db, [serial])
        await audit.record(
            db, request, resource_type="pumps", resource_id=serial, clinic_id=clinic_id
        )
    return await _state(db, principal, serial)


def _body_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise Problem(
            422,
            "scheduled_for needs a UTC offset",
            kind="validation",
            errors=[FieldError(field="body.scheduled_for", message="RFC 3339 with an offset")],
        )
    return value.astimezone(UTC)


@router.get(
    "/v1/refills/due",
    tags=["worklist"],
    summary="The refill worklist: pumps by their effective refill deadline (low alarm, drug "
    "age or battery, the earliest)",
    response_model=models.Page[models.WorklistItem],
)
async def refills_due(
    principal: Auth,
    db: Db,
    within_days: Annotated[float, Query(gt=0, le=3650, description="Horizon in days")] = 30,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Response:
    # The JSON as worklist.page's models would write it, without building them.
    found = await worklist.page_json(
        db, principal, within_days=within_days, limit=limit, cursor=cursor
    )
    return Response(found, media_type="application/json")
