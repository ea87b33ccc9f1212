"""Every SQL statement of the notification worker. Parameters only; nothing is built from
input."""

# -- fan-out -------------------------------------------------------------------------------------

# Events not yet fanned out, oldest first; several workers take disjoint rows.
CLAIM_OUTBOX = """
SELECT o.id, o.created_at, o.event, o.alert_id, o.clinic_id, o.payload,
       c.name AS clinic_name, c.timezone, c.notification_settings
FROM outbox o
LEFT JOIN clinics c ON c.id = o.clinic_id
WHERE o.dispatched_at IS NULL
ORDER BY o.id
LIMIT $1
FOR UPDATE OF o SKIP LOCKED
"""

ACTIVE_WEBHOOKS = """
SELECT id, clinic_id, url, events FROM webhooks
WHERE clinic_id = ANY($1::uuid[]) AND deleted_at IS NULL AND disabled_at IS NULL
ORDER BY created_at, id
"""

# The patient of each alert event, as the pump's holder was when the event happened (a pump
# moved since must not put its new patient's name in the old clinic's email).
ALERT_PATIENTS = """
SELECT o.id, p.display_name, p.mrn
FROM outbox o
JOIN alerts a ON a.id = o.alert_id
CROSS JOIN LATERAL pump_holder(a.serial, o.created_at) h
JOIN patients p ON p.id = h.patient_id AND p.clinic_id = o.clinic_id
WHERE o.id = ANY($1::bigint[])
"""

INSERT_DELIVERIES = """
INSERT INTO deliveries (outbox_id, alert_id, clinic_id, event, channel, target, webhook_id,
                        idempotency_key, payload, due_at, next_attempt_at, created_at)
SELECT o, a, c, e, ch, t, w, k, p, d, d, $11
FROM unnest($1::bigint[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
            $7::uuid[], $8::text[], $9::jsonb[], $10::timestamptz[])
     AS u(o, a, c, e, ch, t, w, k, p, d)
ON CONFLICT (idempotency_key) DO NOTHING
"""

MARK_DISPATCHED = "UPDATE outbox SET dispatched_at = $2 WHERE id = ANY($1::bigint[])"

# -- delivering ----------------------------------------------------------------------------------

# Take due deliveries under a lease: next_attempt_at moves to the lease's end, so another worker
# takes them only if this one never records an outcome (it died). claimed_at before the update
# says whether an earlier claim ended that way.
CLAIM_DELIVERIES = """
WITH due AS (
    SELECT id, claimed_at AS previous_claim, webhook_id AS hook
    FROM deliveries
    WHERE status = 'pending' AND next_attempt_at <= $1
    ORDER BY next_attempt_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE deliveries d
SET next_attempt_at = $1 + make_interval(secs => $3), claimed_at = $1,
    attempts = d.attempts + 1
FROM due LEFT JOIN webhooks w ON w.id = due.hook
WHERE d.id = due.id
RETURNING d.id, d.outbox_id, d.alert_id, d.clinic_id, d.event, d.channel, d.target,
          d.webhook_id, d.idempotency_key, d.payload, d.due_at, d.created_at, d.attempts,
          due.previous_claim,
          w.url AS webhook_url, w.secret, w.previous_secret, w.previous_secret_expires_at,
          w.disabled_at AS webhook_disabled_at, w.deleted_at AS webhook_deleted_at
"""

NEXT_DUE = "SELECT min(next_attempt_at) FROM deliveries WHERE status = 'pending'"

INSERT_ATTEMPT = """
INSERT INTO delivery_attempts (delivery_id, at, channel, target, outcome, status_code, error,
                               duration_ms)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
"""

# The common outcome in one statement (one round trip): the attempt, the delivery, and the
# webhook's count of failures in a row back to 0.
RECORD_DELIVERED = """
WITH attempt AS (
    INSERT INTO delivery_attempts (delivery_id, at, channel, target, outcome, status_code,
                                   error, duration_ms)
    VALUES ($1, $2, $3, $4, 'delivered', $5, NULL, $6)
), hook AS (
    UPDATE webhooks SET consecutive_failures = 0
    WHERE id = $7 AND consecutive_failures <> 0
)
UPDATE deliveries SET status = 'delivered', delivered_at = $8, claimed_at = NULL,
       last_error = NULL
WHERE id = $1 AND status = 'pending'
"""

DELIVERED = """
UPDATE deliveries SET status = 'delivered', delivered_at = $2, claimed_at = NULL,
       last_error = NULL
WHERE id = $1 AND status = 'pending'
"""

RETRY_LATER = """
UPDATE deliveries SET next_attempt_at = $2, claimed_at = NULL, last_error = $3
WHERE id = $1 AND status = 'pending'
"""

FAILED = """
UPDATE deliveries SET status = 'failed', failed_at = $2, claimed_at = NULL, last_error = $3
WHERE id = $1 AND status = 'pending'
RETURNING id
"""

CANCELLED = """
UPDATE deliveries SET status = 'cancelled', failed_at = $2, claimed_at = NULL, last_error = $3
WHERE id = $1 AND status = 'pending'
"""

WEBHOOK_SUCCEEDED = """
UPDATE webhooks SET consecutive_failures = 0 WHERE id = $1 AND consecutive_failures <> 0
"""

WEBHOOK_FAILED = """
UPDATE webhooks SET consecutive_failures = consecutive_failures + 1
WHERE id = $1 AND disabled_at IS NULL AND deleted_at IS NULL
RETURNING consecutive_failures
"""

DISABLE_WEBHOOK = """
UPDATE webhooks SET disabled_at = $2, disabled_reason = $3
WHERE id = $1 AND disabled_at IS NULL
RETURNING id, clinic_id, url, disabled_at, disabled_reason, consecutive_failures
"""

CANCEL_WEBHOOK_DELIVERIES = """
UPDATE deliveries SET status = 'cancelled', failed_at = $2, claimed_at = NULL, last_error = $3
WHERE webhook_id = $1 AND status = 'pending'
"""


BACKLOG = """
SELECT (SELECT count(*) FROM outbox WHERE dispatched_at IS NULL) AS events,
       (SELECT min(created_at) FROM outbox WHERE dispatched_at IS NULL) AS oldest,
       (SELECT count(*) FROM deliveries WHERE status = 'pending') AS pending
"""

# -- escalation ----------------------------------------------------------------------------------

_ALERT_ROW = """
a.id, a.serial, pu.patient_id, pu.clinic_id, a.rule, a.priority, a.status, a.title, a.detail,
a.facts, a.opened_at, a.updated_at, a.acknowledged_at, a.resolved_at, a.resolution
"""

# Open (unacknowledged) high alerts of clinics, not snoozed at $1: since when they have been so
# (the last change that made them open and high) and the notification escalations since then.
_ESCALATION_STATE = f"""
SELECT {_ALERT_ROW}, c.notification_settings, started.at AS since,
       escalated.n AS escalations, escalated.last_at
FROM alerts a
JOIN pumps pu ON pu.serial = a.serial  -- an unresolved alert is its pump's holder's
JOIN clinics c ON c.id = pu.clinic_id
CROSS JOIN LATERAL (
    SELECT max(h.at) AS at FROM alert_history h
    WHERE h.alert_id = a.id AND h.action IN ('opened', 'reopened', 'escalated', 'custody')
      AND h.to_status = 'open' AND h.to_priority = 'high'
) AS started
CROSS JOIN LATERAL (
    SELECT count(*) AS n, max(h.at) AS last_at FROM alert_history h
    WHERE h.alert_id = a.id AND h.action = 'notification_escalated' AND h.at >= started.at
) AS escalated
WHERE a.status = 'open' AND a.priority = 'high' AND started.at IS NOT NULL
  AND (a.snoozed_until IS NULL OR a.snoozed_until <= $1)
"""

OPEN_HIGH_ALERTS = _ESCALATION_STATE + " ORDER BY started.at"

# One alert, locked against the engine and the API while its escalation is recorded.
LOCK_ALERT = "SELECT id FROM alerts WHERE id = $1 FOR UPDATE"
ESCALATION_STATE_OF = _ESCALATION_STATE + " AND a.id = $2"

INSERT_ESCALATION = """
INSERT INTO alert_history (alert_id, at, actor, action, from_status, to_status, from_priority,
                           to_priority, reason, facts)
VALUES ($1, $2, 'pumpwatch-alerts', 'notification_escalated', 'open', 'open', 'high', 'high',
        $3, $4)
"""

# -- digest --------------------------------------------------------------------------------------

CLINICS = "SELECT id, name, timezone, notification_settings FROM clinics ORDER BY id"

PUMP_PATIENTS = """
SELECT p.serial, p.refill_appointment_at, pt.display_name, pt.mrn
FROM pumps p JOIN patients pt ON pt.id = p.patient_id
WHERE p.serial = ANY($1::text[])
"""

OPEN_LOW_ALERTS = """
SELECT a.id, a.serial, a.rule, a.title, a.opened_at, p.display_name, p.mrn
FROM alerts a
JOIN pumps pu ON pu.serial = a.serial
LEFT JOIN patients p ON p.id = pu.patient_id
WHERE pu.clinic_id = $1 AND a.status <> 'resolved' AND a.priority = 'low'
ORDER BY a.opened_at, a.id
"""

DIGEST_DELIVERIES = "SELECT count(*) FROM deliveries WHERE idempotency_key = ANY($1::text[])"

# -- digest from the engine's read model (pump_forecasts, migration 0015) ----------------------

# The clinic's assigned pumps whose fresh row reaches the low alarm by $2; a stale row's pump
# (not evaluated since it changed) is forecast from its snapshot instead (DIGEST_STALE).
DIGEST_FORECASTS = """
SELECT f.serial, f.low_alarm_at, f.low_alarm_ml, f.volume_ml, f.state_at, f.therapy, f.zone,
       p.refill_appointment_at, pt.display_name, pt.mrn
FROM pump_forecasts f
JOIN pumps p ON p.serial = f.serial
JOIN patients pt ON pt.id = p.patient_id
WHERE f.clinic_id = $1 AND NOT f.stale AND f.low_alarm_at <= $2
"""
DIGEST_STALE = """
SELECT f.serial FROM pump_forecasts f JOIN pumps p ON p.serial = f.serial
WHERE f.clinic_id = $1 AND f.stale AND p.patient_id IS NOT NULL
ORDER BY f.serial
"""
