"""Every SQL statement of the alert service. Parameters only; nothing is built from input."""

LISTEN_CHANNEL = "pumpwatch_ingest"

# Serialises evaluations of a pump across engines, in a fixed order (no deadlocks).
LOCK_PUMPS = """
SELECT pg_advisory_xact_lock(hashtextextended('pumpwatch.alerts:' || serial, 0))
FROM (SELECT serial FROM unnest($1::text[]) AS u(serial) ORDER BY serial) AS ordered
"""

DATA_CLOCK = "SELECT max(recorded_at) FROM pump_state"

ALL_SERIALS = "SELECT serial FROM pumps ORDER BY serial"

SERIALS_CHANGED_SINCE = "SELECT serial FROM pump_state WHERE updated_at >= $1"

PUMPS = """
SELECT p.serial, p.patient_id, p.refill_appointment_at,
       pt.clinic_id, pt.withdrawal_risk, pt.low_alarm_margin_ml,
       c.timezone, c.alert_settings,
       s.updated_at AS state_updated_at,
       coalesce(s.basis = 'measured' OR s.measured_flow_ml_per_day IS NOT NULL, false)
           AS measured
FROM pumps p
LEFT JOIN patients pt ON pt.id = p.patient_id
LEFT JOIN clinics c ON c.id = pt.clinic_id
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

INSERT_DOSES = """
INSERT INTO dose_history (serial, at, daily_dose_mcg, source)
SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::float8[], $4::text[])
ON CONFLICT DO NOTHING
"""

OPEN_GAPS = """
SELECT serial, min(detected_at) AS oldest,
       sum(last_missing - first_missing + 1) AS missing
FROM sequence_gaps WHERE serial = ANY($1::text[])
GROUP BY serial
"""

# Per (pump, rule): the unresolved alert if there is one, else the last resolved.
# condition_at is when it resolved on the engine's clock (the data's, in replays).
ALERTS = """
SELECT DISTINCT ON (serial, rule)
       id, serial, rule, priority, status, title, detail, resolved_at, condition_at, occurrence
FROM alerts WHERE serial = ANY($1::text[])
ORDER BY serial, rule, (status = 'resolved'), resolved_at DESC NULLS LAST
"""

_ALERT_ROW = """
id, serial, patient_id, clinic_id, rule, priority, status, title, detail, facts, opened_at,
updated_at, acknowledged_at, resolved_at, resolution
"""

INSERT_ALERT = f"""
INSERT INTO alerts (serial, patient_id, clinic_id, rule, priority, status, title, detail,
                    facts, opened_at, updated_at, condition_at, occurrence)
VALUES ($1, $2, $3, $4, $5, 'open', $6, $7, $8, $9, $9, $10, $11)
ON CONFLICT (serial, rule) WHERE status <> 'resolved' DO NOTHING
RETURNING {_ALERT_ROW}
"""

REOPEN_ALERT = f"""
UPDATE alerts SET status = 'open', priority = $2, title = $3, detail = $4, facts = $5,
       updated_at = $6, condition_at = $7, occurrence = $8, acknowledged_at = NULL,
       acknowledged_by = NULL,
       resolved_at = NULL, resolved_by = NULL, resolution = NULL
WHERE id = $1 AND status = 'resolved'
RETURNING {_ALERT_ROW}
"""

REPRIORITISE_ALERT = f"""
UPDATE alerts SET priority = $2, status = $3, title = $4, detail = $5, facts = $6,
       updated_at = $7, condition_at = $8, occurrence = $9
WHERE id = $1 AND status <> 'resolved'
RETURNING {_ALERT_ROW}
"""

RESOLVE_ALERT = f"""
UPDATE alerts SET status = 'resolved', resolved_at = $2, resolved_by = 'pumpwatch-alerts',
       resolution = $3, updated_at = $2, condition_at = $4
WHERE id = $1 AND status <> 'resolved'
RETURNING {_ALERT_ROW}
"""

REFRESH_ALERTS = """
UPDATE alerts a SET title = r.title, detail = r.detail, facts = r.facts, condition_at = r.at,
       occurrence = r.occurrence
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::timestamptz[], $6::text[])
     AS r(id, title, detail, facts, at, occurrence)
WHERE a.id = r.id AND a.status <> 'resolved'
"""

INSERT_HISTORY = """
INSERT INTO alert_history (alert_id, at, actor, action, from_status, to_status, from_priority,
                           to_priority, reason, facts)
VALUES ($1, $2, 'pumpwatch-alerts', $3, $4, $5, $6, $7, $8, $9)
"""

INSERT_OUTBOX = """
INSERT INTO outbox (event, alert_id, clinic_id, payload) VALUES ($1, $2, $3, $4)
"""
