"""Rows for alert tests: clinics, patients, pumps and readings written straight to the database
(the ingest path has tests of its own). Connections must have the JSON codecs of
``services.alerts.engine.prepare_connection``."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from services.storage.database import Connection


async def clinic(
    conn: Connection,
    *,
    name: str = "Spinal unit",
    timezone: str = "Europe/Berlin",
    alert_settings: dict[str, Any] | None = None,
) -> str:
    clinic_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO clinics (name, timezone, alert_settings) VALUES ($1, $2, $3) RETURNING id",
        name,
        timezone,
        alert_settings or {},
    )
    return str(clinic_id)


async def patient(
    conn: Connection,
    clinic_id: str,
    *,
    mrn: str | None = None,
    withdrawal_risk: str = "standard",
    low_alarm_margin_ml: float | None = None,
) -> str:
    patient_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO patients (clinic_id, mrn, display_name, withdrawal_risk, "
        "low_alarm_margin_ml) VALUES ($1, $2, 'Test Patient', $3, $4) RETURNING id",
        uuid.UUID(clinic_id),
        mrn or uuid.uuid4().hex[:8],
        withdrawal_risk,
        low_alarm_margin_ml,
    )
    return str(patient_id)


async def pump(
    conn: Connection,
    serial: str,
    *,
    patient_id: str | None = None,
    refill_appointment_at: datetime | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO pumps (serial, model, patient_id, refill_appointment_at) "
        "VALUES ($1, 'SynchroMed II 8637-40', $2, $3) "
        "ON CONFLICT (serial) DO UPDATE SET patient_id = EXCLUDED.patient_id, "
        "refill_appointment_at = EXCLUDED.refill_appointment_at",
        serial,
        None if patient_id is None else uuid.UUID(patient_id),
        refill_appointment_at,
    )


async def reading(
    conn: Connection,
    serial: str,
    recorded_at: datetime,
    *,
    volume_ml: float = 20.0,
    capacity_ml: float = 40.0,
    low_alarm_ml: float | None = 2.0,
    basis: str = "calculated",
    concentration_mcg_per_ml: float = 2000.0,
    rate_ml_per_day: float = 0.2,
    daily_dose_mcg: float | None = None,
    measured_flow_ml_per_day: float | None = None,
    battery_status: str = "ok",
    alarms: tuple[str, ...] = (),
) -> None:
    """One reading, and the pump's state moved to it if it is the newest."""
    values = (
        serial,
        recorded_at,
        volume_ml,
        capacity_ml,
        low_alarm_ml,
        basis,
        concentration_mcg_per_ml,
        rate_ml_per_day,
        daily_dose_mcg
        if daily_dose_mcg is not None
        else rate_ml_per_day * concentration_mcg_per_ml,
        measured_flow_ml_per_day,
        battery_status,
        list(alarms),
    )
    await conn.execute("SELECT ensure_readings_partition($1)", recorded_at)
    await conn.execute(
        """INSERT INTO readings (msg_id, serial, recorded_at, utc_offset_minutes, received_at,
               volume_ml, capacity_ml, low_alarm_ml, basis, drug_name, concentration_mcg_per_ml,
               infusion_mode, rate_ml_per_day, daily_dose_mcg, measured_flow_ml_per_day,
               battery_status, alarms, payload)
           VALUES (gen_random_uuid(), $1, $2, 0, now(), $3, $4, $5, $6, 'baclofen', $7,
               'continuous', $8, $9, $10, $11, $12, '{}')""",
        *values,
    )
    await conn.execute(
        """INSERT INTO pump_state (serial, msg_id, recorded_at, utc_offset_minutes, received_at,
               volume_ml, capacity_ml, low_alarm_ml, basis, drug_name, concentration_mcg_per_ml,
               infusion_mode, rate_ml_per_day, daily_dose_mcg, measured_flow_ml_per_day,
               battery_status, alarms)
           VALUES ($1, gen_random_uuid(), $2, 0, now(), $3, $4, $5, $6, 'baclofen', $7,
               'continuous', $8, $9, $10, $11, $12)
           ON CONFLICT (serial) DO UPDATE SET recorded_at = EXCLUDED.recorded_at,
               volume_ml = EXCLUDED.volume_ml, low_alarm_ml = EXCLUDED.low_alarm_ml,
               basis = EXCLUDED.basis, rate_ml_per_day = EXCLUDED.rate_ml_per_day,
               daily_dose_mcg = EXCLUDED.daily_dose_mcg,
               measured_flow_ml_per_day = EXCLUDED.measured_flow_ml_per_day,
               battery_status = EXCLUDED.battery_status, alarms = EXCLUDED.alarms,
               updated_at = now()
           WHERE pump_state.recorded_at < EXCLUDED.recorded_at""",
        *values,
    )


async def refill_event(
    conn: Connection,
    serial: str,
    recorded_at: datetime,
    *,
    residual_ml: float,
    added_ml: float = 38.0,
    expected_residual_ml: float | None = None,
) -> None:
    body: dict[str, Any] = {
        "residual_ml": residual_ml,
        "added_ml": added_ml,
        "drug": "baclofen",
        "concentration_mcg_per_ml": 2000,
    }
    if expected_residual_ml is not None:
        body["expected_residual_ml"] = expected_residual_ml
    await conn.execute(
        "INSERT INTO events (msg_id, serial, type, recorded_at, received_at, body, payload) "
        "VALUES (gen_random_uuid(), $1, 'refill', $2, now(), $3, '{}')",
        serial,
        recorded_at,
        body,
    )


async def claim_event(
    conn: Connection,
    serial: str,
    code: str,
    *,
    recorded_at: datetime,
    expires_at: datetime,
) -> None:
    """What ingest stores when a programmer shows a claim code (event type ``claim``)."""
    await conn.execute(
        "INSERT INTO events (msg_id, serial, type, recorded_at, received_at, body, payload) "
        "VALUES (gen_random_uuid(), $1, 'claim', $2, now(), $3, '{}')",
        serial,
        recorded_at,
        {"code": code, "expires_at": expires_at.isoformat()},
    )


async def rollup(conn: Connection) -> None:
    """The hourly rollups of readings stored by these fixtures (ingest keeps them itself)."""
    await conn.execute(
        """INSERT INTO readings_hourly
           SELECT serial, date_trunc('hour', recorded_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                  count(*), sum(volume_ml), min(volume_ml), max(volume_ml), max(recorded_at),
                  (array_agg(volume_ml ORDER BY recorded_at DESC))[1],
                  count(measured_flow_ml_per_day), coalesce(sum(measured_flow_ml_per_day), 0),
                  sum(rate_ml_per_day)
           FROM readings GROUP BY 1, 2"""
    )
