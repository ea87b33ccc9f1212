"""Pump state, forecasts and refill reconciliation as the alert engine sees them: the same
snapshot loader and the same therapy and rule functions (one implementation)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.api import models
from services.api.auth import Principal
from services.domain import rules, therapy
from services.domain.alerting import RuleSettings, Snapshot
from services.storage import forecasts
from services.storage.database import Connection
from services.storage.snapshots import load as load_snapshots

PROJECTION_DAYS = 30


async def snapshots(
    conn: Connection, serials: list[str], *, now: datetime | None = None, refills: int = 3
) -> dict[str, Snapshot]:
    at = now or datetime.now(UTC)
    loaded = await load_snapshots(
        conn, serials, now=at, wall_now=at, settings=RuleSettings(), refills_kept=refills
    )
    return {serial: snapshot for serial, (snapshot, _) in loaded.items()}


def forecast(snapshot: Snapshot) -> models.Forecast | None:
    found = rules.pump_forecast(snapshot)
    latest = snapshot.latest
    if found is None or latest is None:
        return None
    deadline = rules.pump_deadline(snapshot)
    worst = rules.worst_case(snapshot)
    return models.Forecast(
        volume_ml=round(found.volume_ml, 3),
        low_alarm_ml=found.low_alarm_ml,
        rate_ml_per_day=round(found.rate_ml_per_day, 4),
        low_alarm_at=found.low_alarm_at,
        empty_at=found.empty_at,
        days_to_low_alarm=None
        if found.low_alarm_at is None
        else round(therapy.days_until(found.low_alarm_at, snapshot.now), 2),
        basis=latest.basis or "calculated",
        refill_deadline_at=None if deadline is None else deadline.at,
        refill_deadline_reason=None if deadline is None else deadline.reason,
        days_to_refill_deadline=None
        if deadline is None
        else round(therapy.days_until(deadline.at, snapshot.now), 2),
        worst_case_empty_at=None if worst is None else worst.empty_at,
    )


def row_forecast(row: asyncpg.Record, now: datetime) -> models.Forecast | None:
    """The forecast object from a fresh read-model row (sql.FORECAST_COLUMNS), as
    :func:`forecast` makes it of the pump's snapshot."""
    if row["f_rate_ml_per_day"] is None:
        return None
    low_alarm_at, deadline_at = row["f_low_alarm_at"], row["f_deadline_at"]
    return models.Forecast(
        volume_ml=round(max(0.0, row["f_volume_ml"]), 3),
        low_alarm_ml=row["f_low_alarm_ml"],
        rate_ml_per_day=round(row["f_rate_ml_per_day"], 4),
        low_alarm_at=low_alarm_at,
        empty_at=row["f_empty_at"],
        days_to_low_alarm=None
        if low_alarm_at is None
        else round(therapy.days_until(low_alarm_at, now), 2),
        basis=row["f_basis"] or "calculated",
        refill_deadline_at=deadline_at,
        refill_deadline_reason=row["f_deadline_reason"],
        days_to_refill_deadline=None
        if deadline_at is None
        else round(therapy.days_until(deadline_at, now), 2),
        worst_case_empty_at=row["f_worst_case_empty_at"],
    )


def row_gaps(row: asyncpg.Record) -> models.UnrecoveredGaps | None:
    """The unrecovered gaps of a row with sql.FORECAST_COLUMNS."""
    if not row["missing"]:
        return None
    return models.UnrecoveredGaps(
        missing_messages=int(row["missing"]),
        missing_from=row["missing_from"],
        missing_until=row["missing_until"],
    )


async def pump_states(
    db: Connection, rows: list[asyncpg.Record], principal: Principal, now: datetime
) -> list[models.PumpState]:
    """Pumps' states (rows of sql.PUMP_STATE or a LIST_*_PUMPS statement as of ``now``), each
    forecast from its read-model row when that is fresh, else from the pump's snapshot (one
    load for all the stale ones), as the engine builds it."""
    stale = [r["serial"] for r in rows if not r["forecast_fresh"]]
    found = await snapshots(db, stale, now=now) if stale else {}
    return [
        pump_state(r, found.get(r["serial"]), principal)
        if not r["forecast_fresh"]
        else pump_state(
            r,
            None,
            principal,
            found=(row_forecast(r, now), row_gaps(r)),
            volume_now=forecasts.volume_now_ml(
                r["f_volume_ml"], r["f_state_at"], r["f_therapy"], r["f_zone"], now
            ),
        )
        for r in rows
    ]


def pump_state(
    row: asyncpg.Record,
    snapshot: Snapshot | None,
    principal: Principal,
    *,
    found: tuple[models.Forecast | None, models.UnrecoveredGaps | None] | None = None,
    volume_now: float | None = None,
) -> models.PumpState:
    """``found``: the forecast and the unrecovered gaps when known (the read model's), else
    computed from ``snapshot``; ``volume_now`` the reservoir now when known, else projected from
    ``snapshot``."""
    has_state = row["recorded_at"] is not None
    if found is None:
        found = (
            None if snapshot is None else forecast(snapshot),
            None
            if snapshot is None or not snapshot.missing_messages
            else models.UnrecoveredGaps(
                missing_messages=snapshot.missing_messages,
                missing_from=snapshot.missing_from,
                missing_until=snapshot.missing_until,
            ),
        )
    if volume_now is None and snapshot is not None:
        volume_now = rules.volume_now_ml(snapshot)
    return models.PumpState(
        serial=row["serial"],
        model=row["model"] or row["registered_model"],
        patient_id=row["patient_id"] if principal.identified else None,
        clinic_id=row["clinic_id"],
        implanted_on=row["implanted_on"],
        refill_appointment_at=row["refill_appointment_at"],
        last_seen_at=row["recorded_at"],
        volume_ml=row["volume_ml"],
        volume_now_ml=None if volume_now is None else round(volume_now, 3),
        capacity_ml=row["capacity_ml"],
        low_alarm_ml=row["low_alarm_ml"],
        basis=row["basis"],
        therapy=models.Therapy(
            drug_name=row["drug_name"],
            concentration_mcg_per_ml=row["concentration_mcg_per_ml"],
            infusion_mode=row["infusion_mode"],
            rate_ml_per_day=row["rate_ml_per_day"],
            daily_dose_mcg=row["daily_dose_mcg"],
            schedule=row["schedule"],
        )
        if has_state
        else None,
        measured_flow_ml_per_day=row["measured_flow_ml_per_day"],
        battery_pct=row["battery_pct"],
        battery_status=row["battery_status"],
        alarms=list(row["alarms"] or ()),
        forecast=found[0],
        unrecovered_gaps=found[1],
    )


def projected(snapshot: Snapshot) -> list[models.SeriesPoint]:
    """The reservoir from its latest state forward at the programmed rate, a point a day."""
    state = rules.projection_state(snapshot)
    if state is None:
        return []
    start = state.recorded_at
    points = []
    for day in range(PROJECTION_DAYS + 1):
        at = start + timedelta(days=day)
        points.append(
            models.SeriesPoint(
                at=at.astimezone(UTC),
                volume_ml=round(therapy.volume_now(state, at, snapshot.timezone), 3),
            )
        )
    return points


def refill_out(
    serial: str, reconciled: tuple[Any, rules.Reconciliation | None], settings: RuleSettings
) -> models.RefillOut:
    refill, found = reconciled
    return models.RefillOut(
        serial=serial,
        recorded_at=refill.recorded_at,
        residual_ml=refill.residual_ml,
        added_ml=refill.added_ml,
        drug=refill.drug,
        concentration_mcg_per_ml=refill.concentration_mcg_per_ml,
        discrepancy=None
        if found is None
        else models.DiscrepancyOut(
            expected_residual_ml=round(found.found.expected_residual_ml, 3),
            actual_residual_ml=found.found.actual_residual_ml,
            delta_ml=round(found.found.delta_ml, 3),
            relative=None if found.found.relative is None else round(found.found.relative, 4),
            classification=found.kind(settings),
            limit_ml=found.limit_ml(settings),
            expected_from=found.source,
        ),
    )


def alert_out(row: asyncpg.Record | Mapping[str, Any], principal: Principal) -> models.AlertOut:
    """The alert object; for the fleet role without people or their free text (who
    acknowledged, resolved or snoozed it, and their notes: they may name a patient)."""
    people = principal.identified
    resolver = row["resolved_by"]
    by_engine = resolver is None or resolver.get("type") == "service"
    return models.AlertOut(
        id=row["id"],
        serial=row["serial"],
        patient_id=row["patient_id"] if principal.identified else None,
        clinic_id=row["clinic_id"],
        rule=row["rule"],
        priority=row["priority"],
        status=row["status"],
        title=row["title"],
        detail=row["detail"],
        facts=row["facts"] or {},
        opened_at=row["opened_at"],
        updated_at=row["updated_at"],
        acknowledged_at=row["acknowledged_at"],
        acknowledged_by=row["acknowledged_by"] if people else None,
        resolved_at=row["resolved_at"],
        resolved_by=row["resolved_by"] if people or by_engine else None,
        resolution=row["resolution"] if people or by_engine else None,
        condition=row["condition"],
        snoozed_until=row["snoozed_until"],
        snoozed_by=row["snoozed_by"] if people else None,
        snooze_note=row["snooze_note"] if people else None,
    )


def patient_out(row: asyncpg.Record) -> models.Patient:
    return models.Patient(**{k: row[k] for k in models.Patient.model_fields})
