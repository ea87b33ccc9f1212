"""Loading what the rules look at, for a batch of pumps at once (a handful of set queries)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg

from services.domain.alerting import (
    Bolus,
    DoseChange,
    Patient,
    Reading,
    Refill,
    RuleSettings,
    Snapshot,
    Step,
    Therapy,
)
from services.logs import get
from services.storage import sql
from services.storage.database import Connection

log = get(__name__)

_REFILLS_KEPT = 3
_NO_REFILL_LOOKBACK = timedelta(days=200)
_ERI_LOOKBACK_SLACK_DAYS = 30
"""The first ERI reading is looked for this much beyond the stop days: a pump past them has
stopped or is about to, whenever it began."""


@dataclass(frozen=True, slots=True)
class PumpContext:
    """What the engine needs besides the snapshot to record alert changes."""

    serial: str
    patient_id: str | None
    clinic_id: str | None
    state_updated_at: datetime | None
    """When ingest last moved the pump's state (its commit): for the latency metric."""
    new_dose: DoseChange | None
    """A programmed dose the dose history does not have yet."""


async def load(
    conn: Connection,
    serials: list[str],
    *,
    now: datetime,
    wall_now: datetime,
    settings: RuleSettings,
    refills_kept: int = _REFILLS_KEPT,
) -> dict[str, tuple[Snapshot, PumpContext]]:
    pumps = {r["serial"]: r for r in await conn.fetch(sql.PUMPS, serials)}
    if not pumps:
        return {}
    last_count = settings.flow_stopped_clear_readings + 1
    readings: dict[str, dict[datetime, Reading]] = defaultdict(dict)
    for row in await conn.fetch(sql.LAST_READINGS, serials, last_count, now):
        readings[row["serial"]][row["recorded_at"]] = _reading(row)
    measured = [s for s, r in pumps.items() if r["measured"]]
    # A day more than the longest delivery window, so that readings far apart still cover it.
    hours = max(settings.under_infusion_min_hours, settings.over_infusion_min_hours) + 24
    window_start = now - timedelta(hours=hours)
    if measured:
        for row in await conn.fetch(sql.WINDOW_READINGS, measured, window_start, now):
            readings[row["serial"]][row["recorded_at"]] = _reading(row)

    refills: dict[str, list[Refill]] = defaultdict(list)
    for row in await conn.fetch(sql.LAST_REFILLS, serials, refills_kept, now):
        refills[row["serial"]].append(_refill(row["recorded_at"], row["body"]))
    for found in refills.values():
        found.sort(key=lambda r: r.recorded_at)
    refill_times = [(s, r.recorded_at) for s, found in refills.items() for r in found]
    if refill_times:
        rows = await conn.fetch(
            sql.READINGS_BEFORE, [s for s, _ in refill_times], [at for _, at in refill_times]
        )
        for row in rows:
            readings[row["serial"]][row["recorded_at"]] = _reading(row)
    # Boluses since the oldest refill kept (reconciliation) and over the delivery window.
    since = [
        min(refills[s][0].recorded_at, window_start)
        if refills.get(s)
        else now - _NO_REFILL_LOOKBACK
        for s in serials
    ]
    boluses: dict[str, list[Bolus]] = defaultdict(list)
    for row in await conn.fetch(sql.BOLUSES_SINCE, serials, since, now):
        boluses[row["serial"]].append(Bolus(row["recorded_at"], float(row["body"]["dose_mcg"])))

    window = now - timedelta(days=settings.dose_escalation_window_days)
    doses: dict[str, list[DoseChange]] = defaultdict(list)
    for row in await conn.fetch(sql.DOSES, serials, window, now):
        doses[row["serial"]].append(DoseChange(row["at"], row["daily_dose_mcg"]))

    gaps = {r["serial"]: r for r in await conn.fetch(sql.OPEN_GAPS, serials)}

    eri_since = await _eri_since(conn, readings, now, settings)

    out: dict[str, tuple[Snapshot, PumpContext]] = {}
    for serial, pump in pumps.items():
        recent = tuple(r for _, r in sorted(readings[serial].items()))
        latest = recent[-1] if recent else None
        pump_doses = sorted(doses[serial], key=lambda d: d.at)
        new_dose = _new_dose(latest, pump_doses)
        if new_dose is not None:
            pump_doses.append(new_dose)
        gap = gaps.get(serial)
        snapshot = Snapshot(
            serial=serial,
            now=now,
            settings=_clinic_settings(settings, pump["alert_settings"], pump["clinic_id"]),
            timezone=_zone(pump["timezone"], latest),
            latest=latest,
            recent=recent,
            refills=tuple(refills[serial]),
            boluses=tuple(sorted(boluses[serial], key=lambda b: b.recorded_at)),
            dose_changes=tuple(pump_doses),
            patient=None
            if pump["patient_id"] is None
            else Patient(pump["withdrawal_risk"], pump["low_alarm_margin_ml"]),
            refill_appointment_at=pump["refill_appointment_at"],
            open_gap_minutes=None
            if gap is None
            else ((wall_now - gap["oldest"]).total_seconds() / 60),
            missing_messages=0 if gap is None else int(gap["missing"]),
            missing_from=None if gap is None else gap["missing_from"],
            missing_until=None if gap is None else gap["missing_until"],
            battery_eri_since=eri_since.get(serial),
        )
        context = PumpContext(
            serial,
            None if pump["patient_id"] is None else str(pump["patient_id"]),
            None if pump["clinic_id"] is None else str(pump["clinic_id"]),
            pump["state_updated_at"],
            new_dose,
        )
        out[serial] = (snapshot, context)
    return out


async def _eri_since(
    conn: Connection,
    readings: dict[str, dict[datetime, Reading]],
    now: datetime,
    settings: RuleSettings,
) -> dict[str, datetime]:
    """When each pump whose latest reading shows the elective replacement indicator first
    showed it."""
    eri = [s for s, found in readings.items() if _at_eri(found)]
    if not eri:
        return {}
    lookback = now - timedelta(days=settings.battery_eri_stop_days + _ERI_LOOKBACK_SLACK_DAYS)
    rows = await conn.fetch(sql.ERI_SINCE, eri, lookback, now)
    return {row["serial"]: row["since"] for row in rows}


def _at_eri(readings: dict[datetime, Reading]) -> bool:
    """The latest of these readings reports the elective replacement indicator (not EOS)."""
    if not readings:
        return False
    latest = readings[max(readings)]
    return latest.battery_status == "eri" or "eri" in latest.alarms


def _reading(row: asyncpg.Record | Mapping[str, Any]) -> Reading:
    schedule = tuple(
        Step(int(step["start"][:2]) * 60 + int(step["start"][3:5]), float(step["rate_ml_per_day"]))
        for step in (row["schedule"] or ())
    )
    return Reading(
        recorded_at=row["recorded_at"].astimezone(
            timezone(timedelta(minutes=row["utc_offset_minutes"]))
        ),
        volume_ml=row["volume_ml"],
        capacity_ml=row["capacity_ml"],
        low_alarm_ml=row["low_alarm_ml"],
        basis=row["basis"],
        drug_name=row["drug_name"],
        therapy=Therapy(
            mode=row["infusion_mode"],
            rate_ml_per_day=row["rate_ml_per_day"],
            concentration_mcg_per_ml=row["concentration_mcg_per_ml"],
            daily_dose_mcg=row["daily_dose_mcg"],
            schedule=schedule,
        ),
        measured_flow_ml_per_day=row["measured_flow_ml_per_day"],
        battery_pct=row["battery_pct"],
        battery_status=row["battery_status"],
        alarms=tuple(row["alarms"]),
    )


def _refill(recorded_at: datetime, body: dict[str, Any]) -> Refill:
    expected = body.get("expected_residual_ml")
    return Refill(
        recorded_at=recorded_at,
        residual_ml=float(body["residual_ml"]),
        added_ml=float(body["added_ml"]),
        drug=str(body["drug"]),
        concentration_mcg_per_ml=float(body["concentration_mcg_per_ml"]),
        expected_residual_ml=None if expected is None else float(expected),
    )


def _programmed_dose(reading: Reading) -> float:
    therapy = reading.therapy
    if therapy.daily_dose_mcg is not None:
        return therapy.daily_dose_mcg
    return therapy.rate_ml_per_day * therapy.concentration_mcg_per_ml


def _new_dose(latest: Reading | None, known: list[DoseChange]) -> DoseChange | None:
    if latest is None:
        return None
    dose = _programmed_dose(latest)
    if known and (
        known[-1].at >= latest.recorded_at or abs(known[-1].daily_dose_mcg - dose) < 1e-9
    ):
        return None
    return DoseChange(latest.recorded_at, dose)


def _zone(name: str | None, latest: Reading | None) -> tzinfo:
    """The clinic's zone; for an unassigned pump, the offset of its latest reading."""
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            log.error("clinic_timezone_unknown", timezone=name)
    if latest is not None and latest.recorded_at.tzinfo is not None:
        return latest.recorded_at.tzinfo
    return UTC


def _clinic_settings(
    defaults: RuleSettings, overrides: dict[str, Any] | None, clinic_id: object
) -> RuleSettings:
    try:
        return defaults.for_clinic(overrides)
    except ValueError as exc:  # a bad override must not silence the rules: use the defaults
        log.error("clinic_settings_invalid", clinic_id=str(clinic_id), error=str(exc))
        return defaults


# What readers building a partial snapshot of one pump (the API's dashboard) need, the loader's
# own conversions.
reading_of = _reading
refill_of = _refill
zone_of = _zone
clinic_settings = _clinic_settings
NO_REFILL_LOOKBACK = _NO_REFILL_LOOKBACK
