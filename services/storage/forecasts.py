"""The pump forecast read model (table ``pump_forecasts``, migration 0015).

The alert engine writes each pump's forecast as it evaluates it, in the transaction of its
alert changes (:func:`versions` before it loads the snapshots, :func:`write` after it applied
what it found). Readers (the API's worklist, the daily digest) read the table; a row whose
``version`` moved since the engine wrote it (a refill, a custody change, a patient's margin,
the clinic's settings: the migration's triggers) is stale, and they compute that pump's
forecast themselves from a snapshot (:func:`of` is the one computation both use). The patient's
and the clinic's triggers also wake the engine for the pumps they made stale (migration 0016);
the API and ingest wake it after refills, bookings, moves and new data.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.domain import rules, therapy
from services.domain.alerting import Snapshot, Step, Therapy
from services.storage import sql
from services.storage.database import Connection

_DAY = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Forecast:
    """One pump's row of the read model: what :func:`rules.pump_forecast`,
    :func:`rules.pump_deadline` and :func:`rules.worst_case` say of its snapshot."""

    serial: str
    last_contact_at: datetime | None
    state_at: datetime | None
    volume_ml: float | None
    low_alarm_ml: float | None
    rate_ml_per_day: float | None
    basis: str | None
    drug_name: str | None
    therapy: dict[str, Any] | None
    zone: str
    low_alarm_at: datetime | None
    empty_at: datetime | None
    worst_case_empty_at: datetime | None
    deadline_at: datetime | None
    deadline_reason: str | None
    last_refill_at: datetime | None


def of(snapshot: Snapshot) -> Forecast:
    """The read model's row of a pump's snapshot."""
    latest = snapshot.latest
    seen = rules.outlook(snapshot)
    state, found, deadline, worst = seen.state, seen.forecast, seen.deadline, seen.worst_case
    return Forecast(
        serial=snapshot.serial,
        last_contact_at=None if latest is None else latest.recorded_at.astimezone(UTC),
        state_at=None if state is None else state.recorded_at.astimezone(UTC),
        volume_ml=None if state is None else state.volume_ml,
        low_alarm_ml=None if found is None else found.low_alarm_ml,
        rate_ml_per_day=None if found is None else found.rate_ml_per_day,
        basis=None if found is None else found.basis,
        drug_name=None if latest is None else latest.drug_name,
        therapy=None if state is None else therapy_json(state.therapy),
        zone=zone_name(snapshot.timezone),
        low_alarm_at=None if found is None else found.low_alarm_at,
        empty_at=None if found is None else found.empty_at,
        worst_case_empty_at=None if worst is None else worst.empty_at,
        deadline_at=None if deadline is None else deadline.at,
        deadline_reason=None if deadline is None else deadline.reason,
        last_refill_at=snapshot.refills[-1].recorded_at if snapshot.refills else None,
    )


async def versions(conn: Connection, serials: list[str]) -> dict[str, int]:
    """The rows' versions, locked until the caller's transaction ends: read before the snapshots
    are (the engine records what it saw; a change to the pump waits for the evaluation's commit
    and then leaves the row stale, never wrongly fresh)."""
    return {r["serial"]: r["version"] for r in await conn.fetch(sql.FORECAST_VERSIONS, serials)}


async def write(
    conn: Connection, found: list[Forecast], seen: dict[str, int], *, wall_now: datetime
) -> None:
    """Store these forecasts as of the versions seen, with each pump's unresolved alerts (as
    this transaction sees them: after the changes it made)."""
    if not found:
        return
    columns: list[list[Any]] = [
        [f.serial for f in found],
        [seen.get(f.serial, 1) for f in found],
        [f.last_contact_at for f in found],
        [f.state_at for f in found],
        [f.volume_ml for f in found],
        [f.low_alarm_ml for f in found],
        [f.rate_ml_per_day for f in found],
        [f.basis for f in found],
        [f.drug_name for f in found],
        [f.therapy for f in found],
        [f.zone for f in found],
        [f.low_alarm_at for f in found],
        [f.empty_at for f in found],
        [f.worst_case_empty_at for f in found],
        [f.deadline_at for f in found],
        [f.deadline_reason for f in found],
        [f.last_refill_at for f in found],
    ]
    await conn.execute(sql.WRITE_FORECASTS, wall_now, *columns)


def therapy_json(program: Therapy) -> dict[str, Any]:
    return {
        "mode": program.mode,
        "rate_ml_per_day": program.rate_ml_per_day,
        "concentration_mcg_per_ml": program.concentration_mcg_per_ml,
        "daily_dose_mcg": program.daily_dose_mcg,
        "schedule": [[s.start_minute, s.rate_ml_per_day] for s in program.schedule],
    }


def therapy_of(found: dict[str, Any]) -> Therapy:
    return Therapy(
        mode=str(found["mode"]),
        rate_ml_per_day=float(found["rate_ml_per_day"]),
        concentration_mcg_per_ml=float(found["concentration_mcg_per_ml"]),
        daily_dose_mcg=None if found.get("daily_dose_mcg") is None else found["daily_dose_mcg"],
        schedule=tuple(Step(int(m), float(r)) for m, r in found.get("schedule") or ()),
    )


def zone_name(tz: tzinfo) -> str:
    """A zone as stored: its IANA key, else its fixed offset in minutes (``+60``)."""
    if isinstance(tz, ZoneInfo):
        return tz.key
    offset = tz.utcoffset(None) or timedelta(0)
    return f"{int(offset.total_seconds() // 60):+d}"


def zone_of(name: str | None) -> tzinfo:
    if not name:
        return UTC
    if name[0] in "+-":
        return timezone(timedelta(minutes=int(name)))
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


def volume_now_ml(
    volume_ml: float | None,
    state_at: datetime | None,
    program: dict[str, Any] | None,
    zone: str | None,
    now: datetime,
) -> float | None:
    if volume_ml is None or state_at is None or program is None:
        return None
    if not program.get("schedule"):  # a constant rate: no zone, no steps (delivered_ml's way)
        if now <= state_at:
            return max(0.0, volume_ml)
        rate = float(program["rate_ml_per_day"])
        return max(0.0, volume_ml - rate * ((now - state_at) / _DAY))
    used = therapy.delivered_ml(therapy_of(program), state_at, now, zone_of(zone))
    return max(0.0, volume_ml - used)
