"""The SQL of what storage shares between services: the pump snapshot loader's statements.
Parameters only; nothing is built from input."""

PUMPS = """
SELECT p.serial, p.patient_id, p.refill_appointment_at,
       p.clinic_id, pt.withdrawal_risk, pt.low_alarm_margin_ml,
       c.timezone, c.alert_settings,
       s.updated_at AS state_updated_at,
       coalesce(s.basis = 'measured' OR s.measured_flow_ml_per_day IS NOT NULL, false)
           AS measured
FROM pumps p
LEFT JOIN patients pt ON pt.id = p.patient_id
LEFT JOIN clinics c ON c.id = p.clinic_id
LEFT JOIN pump_state s ON s.serial = p.serial
WHERE p.serial = ANY($1::text[])
"""

_READING = """
recorded_at, utc_offset_minutes, volume_ml, capacity_ml, low_alarm_ml, basis, drug_name,
concentration_mcg_per_ml, infusion_mode, rate_ml_per_day, daily_dose_mcg, schedule,
measured_flow_ml_per_day, battery_pct, battery_status, alarms
"""

# The last few readings of every pump (alarm hysteresis, the latest reading).
LAST_READINGS = f"""
SELECT u.serial, r.*
FROM unnest($1::text[]) AS u(serial)
CROSS JOIN LATERAL (
    SELECT {_READING} FROM readings
    WHERE serial = u.serial AND recorded_at <= $3
    ORDER BY recorded_at DESC LIMIT $2
) AS r
"""

# A window of readings of the pumps that measure (flow or level): delivery-ratio fits.
WINDOW_READINGS = f"""
SELECT serial, {_READING} FROM readings
WHERE serial = ANY($1::text[]) AND recorded_at > $2 AND recorded_at <= $3
"""

# The last reading before each refill: the contract's fallback for the expected residual.
READINGS_BEFORE = f"""
SELECT u.serial, r.*
FROM unnest($1::text[], $2::timestamptz[]) AS u(serial, at)
CROSS JOIN LATERAL (
    SELECT {_READING} FROM readings
    WHERE serial = u.serial AND recorded_at < u.at
    ORDER BY recorded_at DESC LIMIT 1
) AS r
"""

LAST_REFILLS = """
SELECT u.serial, e.recorded_at, e.body
FROM unnest($1::text[]) AS u(serial)
CROSS JOIN LATERAL (
    SELECT recorded_at, body FROM events
    WHERE serial = u.serial AND type = 'refill' AND recorded_at <= $3
    ORDER BY recorded_at DESC LIMIT $2
) AS e
"""

BOLUSES_SINCE = """
SELECT b.serial, b.recorded_at, b.body
FROM events b
JOIN unnest($1::text[], $2::timestamptz[]) AS u(serial, since) ON u.serial = b.serial
WHERE b.type = 'bolus' AND b.recorded_at > u.since AND b.recorded_at <= $3
"""

# Doses within the window, and the one in force when it began.
DOSES = """
SELECT serial, at, daily_dose_mcg FROM dose_history
WHERE serial = ANY($1::text[]) AND at >= $2 AND at <= $3
UNION ALL
SELECT u.serial, d.at, d.daily_dose_mcg
FROM unnest($1::text[]) AS u(serial)
CROSS JOIN LATERAL (
    SELECT at, daily_dose_mcg FROM dose_history
    WHERE serial = u.serial AND at < $2 ORDER BY at DESC LIMIT 1
) AS d
"""

# The first reading with the elective replacement indicator, for pumps whose latest shows it
# (only those: a handful), looked back from $3 to $2.
ERI_SINCE = """
SELECT serial, min(recorded_at) AS since FROM readings
WHERE serial = ANY($1::text[]) AND recorded_at > $2 AND recorded_at <= $3
  AND (battery_status = 'eri' OR 'eri' = ANY(alarms))
GROUP BY serial
"""

# Only gaps backfill gave up on: one it is still asking the device for may yet be filled.
OPEN_GAPS = """
SELECT serial, min(detected_at) AS oldest,
       sum(last_missing - first_missing + 1) AS missing,
       min(before_at) AS missing_from, max(after_at) AS missing_until
FROM sequence_gaps WHERE serial = ANY($1::text[]) AND state = 'unrecoverable'
GROUP BY serial
"""

# Per (pump, rule): the unresolved alert if there is one, else the last resolved.
# condition_at is when it resolved on the engine's clock (the data's, in replays).

# --- the pump forecast read model (services/storage/forecasts.py, migration 0015) ------------

# Locked for the evaluation, in serial order, before its alerts: a custody change locks the row
# (the trigger on pumps) before the pump's alerts, so both take them in one order (no deadlock),
# and no change can slip between the version read and the row written.
FORECAST_VERSIONS = """
SELECT serial, version FROM pump_forecasts WHERE serial = ANY($1::text[])
ORDER BY serial FOR UPDATE
"""

# The engine's rows, as of the versions it read before its snapshots ($2), with each pump's
# unresolved alerts as its transaction sees them. The holder and the booked visit are the
# pump's (kept by the trigger on pumps): an existing row's are never written here, so an
# evaluation that loses a race with a custody change cannot give the pump back to its old
# clinic.
WRITE_FORECASTS = """
INSERT INTO pump_forecasts AS f (
    serial, clinic_id, patient_id, refill_appointment_at, version, evaluated_version,
    evaluated_at, last_contact_at, state_at, volume_ml, low_alarm_ml, rate_ml_per_day, basis,
    drug_name, therapy, zone, low_alarm_at, empty_at, worst_case_empty_at, deadline_at,
    deadline_reason, last_refill_at, open_alerts, highest_priority)
SELECT u.serial, p.clinic_id, p.patient_id, p.refill_appointment_at, u.version, u.version,
       $1, u.last_contact_at, u.state_at, u.volume_ml, u.low_alarm_ml, u.rate_ml_per_day,
       u.basis, u.drug_name, u.therapy, u.zone, u.low_alarm_at, u.empty_at,
       u.worst_case_empty_at, u.deadline_at, u.deadline_reason, u.last_refill_at,
       coalesce(a.n, 0), a.highest
FROM unnest($2::text[], $3::bigint[], $4::timestamptz[], $5::timestamptz[], $6::float8[],
            $7::float8[], $8::float8[], $9::text[], $10::text[], $11::jsonb[], $12::text[],
            $13::timestamptz[], $14::timestamptz[], $15::timestamptz[], $16::timestamptz[],
            $17::text[], $18::timestamptz[])
     AS u(serial, version, last_contact_at, state_at, volume_ml, low_alarm_ml, rate_ml_per_day,
          basis, drug_name, therapy, zone, low_alarm_at, empty_at, worst_case_empty_at,
          deadline_at, deadline_reason, last_refill_at)
JOIN pumps p ON p.serial = u.serial
LEFT JOIN LATERAL (
    SELECT count(*) AS n,
           (array_agg(priority ORDER BY CASE priority WHEN 'high' THEN 0
                                                       WHEN 'medium' THEN 1 ELSE 2 END))[1]
               AS highest
    FROM alerts WHERE serial = u.serial AND status <> 'resolved'
) AS a ON true
ORDER BY u.serial
ON CONFLICT (serial) DO UPDATE SET
    evaluated_version = EXCLUDED.evaluated_version, evaluated_at = EXCLUDED.evaluated_at,
    last_contact_at = EXCLUDED.last_contact_at, state_at = EXCLUDED.state_at,
    volume_ml = EXCLUDED.volume_ml, low_alarm_ml = EXCLUDED.low_alarm_ml,
    rate_ml_per_day = EXCLUDED.rate_ml_per_day, basis = EXCLUDED.basis,
    drug_name = EXCLUDED.drug_name, therapy = EXCLUDED.therapy, zone = EXCLUDED.zone,
    low_alarm_at = EXCLUDED.low_alarm_at, empty_at = EXCLUDED.empty_at,
    worst_case_empty_at = EXCLUDED.worst_case_empty_at, deadline_at = EXCLUDED.deadline_at,
    deadline_reason = EXCLUDED.deadline_reason, last_refill_at = EXCLUDED.last_refill_at,
    open_alerts = EXCLUDED.open_alerts, highest_priority = EXCLUDED.highest_priority
"""
