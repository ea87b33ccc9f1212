"""Every SQL statement of the alert service. Parameters only; nothing is built from input."""

# Serialises evaluations of a pump across engines, in a fixed order (no deadlocks).
LOCK_PUMPS = """
SELECT pg_advisory_xact_lock(hashtextextended('pumpwatch.alerts:' || serial, 0))
FROM (SELECT serial FROM unnest($1::text[]) AS u(serial) ORDER BY serial) AS ordered
"""

DATA_CLOCK = "SELECT max(recorded_at) FROM pump_state"

ALL_SERIALS = "SELECT serial FROM pumps ORDER BY serial"

SERIALS_CHANGED_SINCE = "SELECT serial FROM pump_state WHERE updated_at >= $1"

INSERT_DOSES = """
INSERT INTO dose_history (serial, at, daily_dose_mcg, source)
SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::float8[], $4::text[])
ON CONFLICT DO NOTHING
"""

# Per pump and condition: the unresolved alert, else the last resolved.
ALERTS = """
SELECT DISTINCT ON (serial, condition)
       id, serial, rule, priority, status, title, detail, resolved_at, condition_at, occurrence
FROM alerts WHERE serial = ANY($1::text[])
ORDER BY serial, condition, (status = 'resolved'), resolved_at DESC NULLS LAST
"""

# The owner is the pump's holder (migration 0008): now, or when the alert resolved.
_ALERT_ROW = """
id, serial, alert_patient(serial, resolved_at) AS patient_id,
alert_clinic(serial, resolved_at) AS clinic_id, rule, priority, status, title, detail, facts,
opened_at, updated_at, acknowledged_at, resolved_at, resolution
"""

INSERT_ALERT = f"""
INSERT INTO alerts (serial, rule, priority, status, title, detail, facts, opened_at, updated_at,
                    condition_at, occurrence, condition)
VALUES ($1, $2, $3, 'open', $4, $5, $6, $7, $7, $8, $9, $10)
ON CONFLICT (serial, condition) WHERE status <> 'resolved' DO NOTHING
RETURNING {_ALERT_ROW}
"""

REOPEN_ALERT = f"""
UPDATE alerts SET status = 'open', priority = $2, title = $3, detail = $4, facts = $5,
       updated_at = $6, condition_at = $7, occurrence = $8, rule = $9, acknowledged_at = NULL,
       acknowledged_by = NULL,
       resolved_at = NULL, resolved_by = NULL, resolution = NULL
WHERE id = $1 AND status = 'resolved'
RETURNING {_ALERT_ROW}
"""

REPRIORITISE_ALERT = f"""
UPDATE alerts SET priority = $2, status = $3, title = $4, detail = $5, facts = $6,
       updated_at = $7, condition_at = $8, occurrence = $9, rule = $10,
       -- worse: a snooze ends (someone must look at the worse condition now)
       snoozed_until = CASE WHEN $11 THEN NULL ELSE snoozed_until END
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
