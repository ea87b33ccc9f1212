"""The patient dashboard's SQL (services/api/dashboard.py): the pump, its series, its row of the
forecast read model (``pump_forecasts``, migration 0015), its unrecoverable gaps, its clinic's
settings and zone, and what the last refill's reconciliation and the projection look at, in one
round trip."""

from __future__ import annotations

from services.api.sql import (
    _ALERT,
    _PATIENT,
    _PUMP,
    _PUMP_JOINS,
    _SERIES_JSON,
    FORECAST_COLUMNS,
    FORECAST_JOINS,
)

_READING = """
recorded_at, utc_offset_minutes, volume_ml, capacity_ml, low_alarm_ml, basis, drug_name,
concentration_mcg_per_ml, infusion_mode, rate_ml_per_day, daily_dose_mcg, schedule,
measured_flow_ml_per_day, battery_pct, battery_status, alarms
"""
"""A reading as the snapshot loader reads it (services/storage/sql.py)."""

_REFILLS = """
SELECT recorded_at, body FROM events
WHERE serial = p.serial AND type = 'refill' AND recorded_at <= $3
ORDER BY recorded_at DESC LIMIT $4
"""
"""The last $4 refills up to $3, as the loader's LAST_REFILLS."""

# $1 patient, $2/$3 the series' window (and $3 now), $4 refills kept; the boluses after the
# oldest of them (else of the last 200 days) or after $5, whichever is earlier (``bolus_floor``;
# the caller keeps those the loader would). The forecast row is fresh when the engine wrote it
# as of the pump's current version and from its newest reading (a reading it has not evaluated
# yet leaves it behind); the pump's state is then the newest reading up to $3 (the snapshot's
# latest: state moves only forward).
_PUMP_ROW = f"""
{_PUMP}{FORECAST_COLUMNS.format(now="$3")}, ({_SERIES_JSON}) AS series_json,
       c.timezone AS clinic_timezone, c.alert_settings,
       (SELECT jsonb_agg(jsonb_build_object('recorded_at', e.recorded_at, 'body', e.body))
        FROM ({_REFILLS}) e) AS refills_json,
       (SELECT jsonb_agg(to_jsonb(r)) FROM ({_REFILLS}) e
        CROSS JOIN LATERAL (
            SELECT {_READING} FROM readings WHERE serial = p.serial AND recorded_at < e.recorded_at
            ORDER BY recorded_at DESC LIMIT 1) r) AS before_json,
       (SELECT jsonb_agg(jsonb_build_object('recorded_at', b.recorded_at,
                                            'dose_mcg', b.body -> 'dose_mcg'))
        FROM events b WHERE b.serial = p.serial AND b.type = 'bolus'
          AND b.recorded_at > bf.floor AND b.recorded_at <= $3) AS boluses_json,
       bf.floor AS bolus_floor
{_PUMP_JOINS}{FORECAST_JOINS}
LEFT JOIN clinics c ON c.id = p.clinic_id
CROSS JOIN LATERAL (
    SELECT least(coalesce((SELECT min(e.recorded_at) FROM ({_REFILLS}) e),
                          $3 - interval '200 days'), $5) AS floor
) bf
WHERE p.serial = (
    SELECT p2.serial FROM pumps p2 LEFT JOIN pump_state s2 ON s2.serial = p2.serial
    WHERE p2.patient_id = $1 ORDER BY s2.recorded_at DESC NULLS LAST, p2.serial LIMIT 1
)
"""

# The patient ($1) with the pump's row and its unresolved alerts, in one round trip: the
# patient and the alerts as JSON (a patient without a pump: the pump's columns NULL).
DASHBOARD = f"""
SELECT (SELECT to_jsonb(x) FROM (SELECT {_PATIENT} FROM patients WHERE id = $1) x) AS patient_json,
       (SELECT jsonb_agg(to_jsonb(a) ORDER BY a.opened_at DESC) FROM (
            SELECT {_ALERT} FROM alerts WHERE serial = d.serial AND status <> 'resolved') a
       ) AS alerts_json,
       d.*
FROM (SELECT 1) AS one
LEFT JOIN LATERAL ({_PUMP_ROW}) AS d ON true
"""
