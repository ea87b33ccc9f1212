"""The refill worklist (``GET /v1/refills/due``, the dashboard's worklist) from the read model.

The alert engine keeps each pump's forecast in ``pump_forecasts`` (services/storage/
forecasts.py): a page is one indexed query over the fresh rows of the principal's scope, by
effective refill deadline. A pump whose row is stale — the engine has not evaluated it yet (a
new pump; the engine stopped), or a refill, a custody change, the patient's margin or the
clinic's settings changed it since — is computed here from its snapshot, as every pump was
before the read model, and merged into the same order: a pump that needs a refill is never
left off the list because the engine has not been there. The holder is the pump's own, copied
in the transaction that changes it, so a clinic never sees a pump it no longer holds.

What moves with the clock (days left, the volume now) is computed at the request's time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from services.api import models, sql, sql_worklist, views, worklist_json
from services.api.auth import Principal
from services.api.common import cursor_time, decode_cursor, encode_cursor, scope_of
from services.storage import forecasts
from services.storage.database import Connection

_DAY = timedelta(days=1)
_FIRST = (datetime(1, 1, 1, tzinfo=UTC), "")
"""The cursor of the first page: before every deadline."""


@dataclass(frozen=True, slots=True)
class _Due:
    deadline_at: datetime
    serial: str
    reason: str | None
    low_alarm_at: datetime | None
    volume_ml: float | None
    state_at: datetime | None
    zone: str | None
    drug_name: str | None
    program: dict[str, Any] | None
    last_refill_at: datetime | None
    refill_appointment_at: datetime | None
    patient_id: Any
    patient_row: Any
    """The patient's columns (models.Patient's fields), or None."""
    model: str | None
    alerts: list[Any] | None = None
    """The unresolved alerts' records (WORKLIST_ALERTS's columns), when the query joined them."""


async def page(
    db: Connection,
    principal: Principal,
    *,
    within_days: float,
    limit: int,
    cursor: str | None,
    now: datetime | None = None,
) -> models.Page[models.WorklistItem]:
    """The page as models (the web dashboard's worklist)."""
    now = now or datetime.now(UTC)
    due, more = await _due(
        db, principal, within_days=within_days, limit=limit, cursor=cursor, now=now, joined=False
    )
    items = await _items(db, principal, due, now)
    return models.Page(items=items, next_cursor=_next(due) if more else None)


async def page_json(
    db: Connection,
    principal: Principal,
    *,
    within_days: float,
    limit: int,
    cursor: str | None,
    now: datetime | None = None,
) -> bytes:
    """The page as the API's JSON, byte for byte what :func:`page`'s ``model_dump_json`` gives
    (tests/test_worklist_json.py compares them), for less: one round trip with the alerts in
    it, and the answer serialised from plain values already of the models' types rather than
    validated into models first (services/api/worklist_json.py: typed dicts of the models'
    shape, which pydantic serialises as it does the models)."""
    now = now or datetime.now(UTC)
    due, more = await _due(
        db, principal, within_days=within_days, limit=limit, cursor=cursor, now=now, joined=True
    )
    missing = [d.serial for d in due if d.alerts is None]
    fetched: dict[str, list[Any]] = {}
    if missing:
        for a in await db.fetch(sql_worklist.WORKLIST_ALERTS, missing):
            fetched.setdefault(a["serial"], []).append(a)
    people = principal.identified
    items = []
    for d in due:
        volume = forecasts.volume_now_ml(d.volume_ml, d.state_at, d.program, d.zone, now)
        program = d.program
        rows = fetched.get(d.serial, ()) if d.alerts is None else d.alerts
        items.append(
            worklist_json.Item(
                serial=d.serial,
                patient=worklist_json.patient(d.patient_row) if people else None,
                model=d.model,
                volume_now_ml=None if volume is None else round(volume, 3),
                low_alarm_at=d.low_alarm_at,
                days_left=_days(d.low_alarm_at, now),
                refill_deadline_at=d.deadline_at,
                refill_deadline_reason=d.reason,
                days_to_refill_deadline=_days(d.deadline_at, now),
                drug_name=d.drug_name,
                concentration_mcg_per_ml=None
                if program is None
                else float(program["concentration_mcg_per_ml"]),
                rate_ml_per_day=None if program is None else float(program["rate_ml_per_day"]),
                last_refill_at=d.last_refill_at,
                refill_appointment_at=d.refill_appointment_at,
                open_alerts=[worklist_json.alert(a, people) for a in rows],
            )
        )
    found = worklist_json.Page(items=items, next_cursor=_next(due) if more else None)
    return worklist_json.PAGE.dump_json(found)


def _next(due: list[_Due]) -> str:
    return encode_cursor(due[-1].deadline_at, due[-1].serial)


async def _due(
    db: Connection,
    principal: Principal,
    *,
    within_days: float,
    limit: int,
    cursor: str | None,
    now: datetime,
    joined: bool,
) -> tuple[list[_Due], bool]:
    """The page's pumps in order, and whether more follow. ``joined``: with their alerts from
    the read-model query (the stale pumps computed here have ``alerts`` None)."""
    horizon = now + timedelta(days=within_days)
    after = decode_cursor(cursor, 2)
    mark = _FIRST if after is None else (cursor_time(after[0]), after[1] or "")
    scope = scope_of(principal)
    if scope is None:
        query = sql_worklist.WORKLIST_PAGE_ALL if joined else sql_worklist.WORKLIST_ALL
        rows = await db.fetch(query, horizon, mark[0], mark[1], limit + 1)
    else:
        query = sql_worklist.WORKLIST_PAGE_CLINIC if joined else sql_worklist.WORKLIST_CLINIC
        rows = await db.fetch(query, scope, horizon, mark[0], mark[1], limit + 1)
    if rows:
        stale: list[str] = rows[0]["stale"]
    elif scope is None:
        stale = await db.fetchval(sql_worklist.WORKLIST_STALE_ALL)
    else:
        stale = await db.fetchval(sql_worklist.WORKLIST_STALE_CLINIC, scope)
    due = [_from_row(r, joined) for r in rows]
    if stale:
        due.extend(await _computed(db, stale, now, horizon, mark))
        due.sort(key=lambda d: (d.deadline_at, d.serial))
    return due[:limit], len(due) > limit


def _program(row: Any) -> dict[str, Any] | None:
    """The program of a row of the joined query: whole when it has steps, else its numbers
    (what the worklist reads of it; volume_now_ml's constant rate)."""
    if row["stepped"] is not None:
        found: dict[str, Any] = row["stepped"]
        return found
    if not row["programmed"]:
        return None
    return {
        "rate_ml_per_day": row["rate_ml_per_day"],
        "concentration_mcg_per_ml": row["concentration_mcg_per_ml"],
        "schedule": [],
    }


def _from_row(row: Any, joined: bool) -> _Due:
    return _Due(
        deadline_at=row["deadline_at"],
        serial=row["serial"],
        reason=row["deadline_reason"],
        low_alarm_at=row["low_alarm_at"],
        volume_ml=row["volume_ml"],
        state_at=row["state_at"],
        zone=row["zone"],
        drug_name=row["drug_name"],
        program=_program(row) if joined else row["therapy"],
        last_refill_at=row["last_refill_at"],
        refill_appointment_at=row["refill_appointment_at"],
        patient_id=row["patient_id"],
        patient_row=None
        if row["patient_id"] is None
        else (
            row["patient_id"],
            row["patient_clinic_id"],
            row["mrn"],
            row["display_name"],
            row["birth_date"],
            row["withdrawal_risk"],
            row["low_alarm_margin_ml"],
            row["patient_created_at"],
        ),
        model=row["model"],
        alerts=(row["alerts"] or []) if joined else None,
    )


async def _computed(
    db: Connection,
    serials: list[str],
    now: datetime,
    horizon: datetime,
    mark: tuple[datetime, str],
) -> list[_Due]:
    """The stale rows' pumps, forecast from their snapshots now (the engine's computation)."""
    found = await views.snapshots(db, serials, now=now)
    due = []
    for serial, snapshot in found.items():
        forecast = forecasts.of(snapshot)
        at = forecast.deadline_at
        if at is None or at > horizon or (at, serial) <= mark:
            continue
        due.append(
            _Due(
                deadline_at=at,
                serial=serial,
                reason=forecast.deadline_reason,
                low_alarm_at=forecast.low_alarm_at,
                volume_ml=forecast.volume_ml,
                state_at=forecast.state_at,
                zone=forecast.zone,
                drug_name=forecast.drug_name,
                program=forecast.therapy,
                last_refill_at=forecast.last_refill_at,
                refill_appointment_at=snapshot.refill_appointment_at,
                patient_id=None,
                patient_row=None,
                model=None,
            )
        )
    if not due:
        return []
    pumps = {r["serial"]: r for r in await db.fetch(sql.PUMPS_OF, [d.serial for d in due])}
    ids = [p["patient_id"] for p in pumps.values() if p["patient_id"] is not None]
    patients = {r["id"]: r for r in await db.fetch(sql.PATIENTS_BY_ID, ids)} if ids else {}
    return [
        replace(
            d,
            patient_id=pumps[d.serial]["patient_id"],
            patient_row=None
            if pumps[d.serial]["patient_id"] not in patients
            else tuple(
                patients[pumps[d.serial]["patient_id"]][k] for k in worklist_json.PATIENT_FIELDS
            ),
            model=pumps[d.serial]["model"],
        )
        for d in due
        if d.serial in pumps
    ]


async def _items(
    db: Connection, principal: Principal, due: list[_Due], now: datetime
) -> list[models.WorklistItem]:
    if not due:
        return []
    alerts: dict[str, list[models.AlertOut]] = {}
    for a in await db.fetch(sql_worklist.WORKLIST_ALERTS, [d.serial for d in due]):
        alerts.setdefault(a["serial"], []).append(views.alert_out(a, principal))
    items = []
    for d in due:
        volume = forecasts.volume_now_ml(d.volume_ml, d.state_at, d.program, d.zone, now)
        items.append(
            models.WorklistItem(
                serial=d.serial,
                patient=None
                if d.patient_row is None or not principal.identified
                else models.Patient(
                    **dict(zip(worklist_json.PATIENT_FIELDS, d.patient_row, strict=True))
                ),
                model=d.model,
                volume_now_ml=None if volume is None else round(volume, 3),
                low_alarm_at=d.low_alarm_at,
                days_left=_days(d.low_alarm_at, now),
                refill_deadline_at=d.deadline_at,
                refill_deadline_reason=d.reason,
                days_to_refill_deadline=_days(d.deadline_at, now),
                drug_name=d.drug_name,
                concentration_mcg_per_ml=None
                if d.program is None
                else d.program["concentration_mcg_per_ml"],
                rate_ml_per_day=None if d.program is None else d.program["rate_ml_per_day"],
                last_refill_at=d.last_refill_at,
                refill_appointment_at=d.refill_appointment_at,
                open_alerts=alerts.get(d.serial, []),
            )
        )
    return items


def _days(at: datetime | None, now: datetime) -> float | None:
    """therapy.days_until, for the times of the database and the request (UTC already)."""
    return None if at is None else round((at - now) / _DAY, 2)
