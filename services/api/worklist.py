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

from services.api import models, sql, views
from services.api.auth import Principal
from services.api.common import decode_cursor, encode_cursor, scope_of
from services.api.problems import Problem
from services.domain import therapy
from services.storage import forecasts
from services.storage.database import Connection

_FIRST = (datetime(1, 1, 1, tzinfo=UTC), "")
"""The cursor of the first page: before every deadline."""


@dataclass(frozen=True, slots=True)
class _Due:
    deadline_at: datetime
    serial: str
    reason: str | None
    low_alarm_at: datetime | None
    volume_now_ml: float | None
    drug_name: str | None
    program: dict[str, Any] | None
    last_refill_at: datetime | None
    refill_appointment_at: datetime | None
    patient_id: Any
    model: str | None


async def page(
    db: Connection,
    principal: Principal,
    *,
    within_days: float,
    limit: int,
    cursor: str | None,
    now: datetime | None = None,
) -> models.Page[models.WorklistItem]:
    now = now or datetime.now(UTC)
    horizon = now + timedelta(days=within_days)
    after = decode_cursor(cursor, 2)
    mark = _FIRST if after is None else (_cursor_time(after[0]), after[1] or "")
    scope = scope_of(principal)
    if scope is None:
        rows = await db.fetch(sql.WORKLIST_ALL, horizon, mark[0], mark[1], limit + 1)
        stale = await db.fetch(sql.WORKLIST_STALE_ALL)
    else:
        rows = await db.fetch(sql.WORKLIST_CLINIC, scope, horizon, mark[0], mark[1], limit + 1)
        stale = await db.fetch(sql.WORKLIST_STALE_CLINIC, scope)
    due = [_from_row(r, now) for r in rows]
    if stale:
        due.extend(await _computed(db, [r["serial"] for r in stale], now, horizon, mark))
        due.sort(key=lambda d: (d.deadline_at, d.serial))
    shown = due[:limit]
    items = await _items(db, principal, shown, now)
    more = len(due) > limit
    return models.Page(
        items=items,
        next_cursor=encode_cursor(shown[-1].deadline_at, shown[-1].serial) if more else None,
    )


def _from_row(row: Any, now: datetime) -> _Due:
    return _Due(
        deadline_at=row["deadline_at"],
        serial=row["serial"],
        reason=row["deadline_reason"],
        low_alarm_at=row["low_alarm_at"],
        volume_now_ml=forecasts.volume_now_ml(
            row["volume_ml"], row["state_at"], row["therapy"], row["zone"], now
        ),
        drug_name=row["drug_name"],
        program=row["therapy"],
        last_refill_at=row["last_refill_at"],
        refill_appointment_at=row["refill_appointment_at"],
        patient_id=row["patient_id"],
        model=row["model"],
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
                volume_now_ml=forecast.volume_now_ml(now),
                drug_name=forecast.drug_name,
                program=forecast.therapy,
                last_refill_at=forecast.last_refill_at,
                refill_appointment_at=snapshot.refill_appointment_at,
                patient_id=None,
                model=None,
            )
        )
    if not due:
        return []
    pumps = {r["serial"]: r for r in await db.fetch(sql.PUMPS_OF, [d.serial for d in due])}
    return [
        replace(d, patient_id=pumps[d.serial]["patient_id"], model=pumps[d.serial]["model"])
        for d in due
        if d.serial in pumps
    ]


async def _items(
    db: Connection, principal: Principal, due: list[_Due], now: datetime
) -> list[models.WorklistItem]:
    if not due:
        return []
    patients: dict[Any, Any] = {}
    patient_ids = [d.patient_id for d in due if d.patient_id is not None]
    if patient_ids and principal.identified:
        patients = {r["id"]: r for r in await db.fetch(sql.PATIENTS_BY_ID, patient_ids)}
    alerts: dict[str, list[models.AlertOut]] = {}
    for a in await db.fetch(sql.OPEN_ALERTS_OF, [d.serial for d in due]):
        alerts.setdefault(a["serial"], []).append(views.alert_out(a, principal))
    items = []
    for d in due:
        patient = patients.get(d.patient_id)
        days_left = _days(d.low_alarm_at, now)
        items.append(
            models.WorklistItem(
                serial=d.serial,
                patient=None if patient is None else views.patient_out(patient),
                model=d.model,
                volume_now_ml=None if d.volume_now_ml is None else round(d.volume_now_ml, 3),
                low_alarm_at=d.low_alarm_at,
                days_left=days_left,
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
    return None if at is None else round(therapy.days_until(at, now), 2)


def _cursor_time(value: str | None) -> datetime:
    try:
        found = datetime.fromisoformat(value or "")
    except ValueError as exc:
        raise Problem(400, "cursor is not one this API gave out", kind="bad-cursor") from exc
    if found.tzinfo is None:
        raise Problem(400, "cursor is not one this API gave out", kind="bad-cursor")
    return found
