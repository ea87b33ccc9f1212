"""Every SQL statement of the HTTP API. Parameters only; nothing is built from input.

Tenancy is in the statements: ``$scope`` parameters are a clinic id, or NULL for the roles that
see every clinic (admin, fleet); a row of another clinic is simply not found. A pump's history
(readings, events, refills, resolved alerts) is a clinic's only for the periods in which the clinic
held the pump (``held_periods``, migration 0012); an unresolved alert is its pump's holder's now.
"""

# --- keys ----------------------------------------------------------------------------------------

INSERT_KEY = """
INSERT INTO api_keys (key_hash, role, clinic_id, label, created_by)
VALUES ($1, $2, $3, $4, $5) RETURNING id
"""
LIST_KEYS = """
SELECT id, role, clinic_id, label, created_at, created_by, last_used_at, revoked_at
FROM api_keys WHERE $1::uuid IS NULL OR clinic_id = $1 ORDER BY created_at, id
"""
REVOKE_KEY = """
UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING true
"""
KEY_BY_HASH = """
SELECT id, role, clinic_id, label, last_used_at, revoked_at FROM api_keys WHERE key_hash = $1
"""
TOUCH_KEY = "UPDATE api_keys SET last_used_at = $2 WHERE id = $1"

# Failed authentications of a source over the last minute (migration 0011).
AUTH_FAILURES = """
SELECT coalesce(sum(failures), 0) FROM auth_failures
WHERE source = $1 AND bucket > $2::timestamptz - interval '1 minute'
"""
# Count one failure (and forget buckets older than two minutes, everyone's).
RECORD_AUTH_FAILURE = """
WITH forgotten AS (
    DELETE FROM auth_failures WHERE bucket < $2::timestamptz - interval '2 minutes'
)
INSERT INTO auth_failures (source, bucket, failures)
VALUES ($1, date_bin('10 seconds', $2::timestamptz, timestamptz '2000-01-01'), 1)
ON CONFLICT (source, bucket) DO UPDATE SET failures = auth_failures.failures + 1
"""

# --- audit ---------------------------------------------------------------------------------------

INSERT_AUDIT = """
INSERT INTO audit_log (key_id, role, action, resource_type, resource_id, clinic_id, outcome,
                       status, source, user_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
"""

# --- people (migration 0014) ---------------------------------------------------------------------

TEST_CLOCK = """
SELECT now() + make_interval(secs => coalesce((SELECT offset_s FROM api_test_clock), 0))
"""
_USER = "id, email, display_name, role, clinic_id, created_at, created_by, deactivated_at"
INSERT_USER = f"""
INSERT INTO users (email, display_name, role, clinic_id, password_hash, password_changed_at,
                   created_by)
VALUES ($1, $2, $3, $4, $5, CASE WHEN $5::text IS NOT NULL THEN now() END, $6)
ON CONFLICT (email) DO NOTHING
RETURNING {_USER}
"""
USER = f"SELECT {_USER} FROM users WHERE id = $1"
# $1 scope (NULL: every clinic's and the clinic-less roles'), $2/$3 cursor (name, id), $4 limit.
LIST_USERS = f"""
SELECT {_USER} FROM users
WHERE ($1::uuid IS NULL OR clinic_id = $1)
  AND ($2::text IS NULL OR (display_name, id) > ($2, $3::uuid))
ORDER BY display_name, id
LIMIT $4
"""
UPDATE_USER = f"""
UPDATE users SET display_name = coalesce($2, display_name), role = coalesce($3, role),
       clinic_id = CASE WHEN $5::boolean THEN $4 ELSE clinic_id END
WHERE id = $1 AND deactivated_at IS NULL
RETURNING {_USER}
"""
DEACTIVATE_USER = f"""
UPDATE users SET deactivated_at = $2 WHERE id = $1 AND deactivated_at IS NULL RETURNING {_USER}
"""
# A deactivated person's sessions and tokens end in the same transaction (and every lookup
# also refuses a deactivated user's).
END_USER_TOKENS = "DELETE FROM user_tokens WHERE user_id = $1"
END_USER_SESSIONS = "DELETE FROM web_sessions WHERE user_id = $1"
SET_PASSWORD = """
UPDATE users SET password_hash = $2, password_changed_at = $3
WHERE id = $1 AND deactivated_at IS NULL RETURNING id
"""
USER_FOR_SIGNIN = """
SELECT id, email, display_name, role, clinic_id, password_hash FROM users
WHERE email = $1 AND deactivated_at IS NULL
"""
PASSWORD_HASH = "SELECT password_hash FROM users WHERE id = $1 AND deactivated_at IS NULL"

INSERT_LINK = """
INSERT INTO user_links (token_hash, user_id, purpose, created_at, expires_at)
VALUES ($1, $2, $3, $4, $4::timestamptz + make_interval(secs => $5))
"""
# Used once, before it expires, by an active user: the link is spent in this statement.
USE_LINK = """
UPDATE user_links l SET used_at = $2
FROM users u
WHERE l.token_hash = $1 AND l.used_at IS NULL AND l.expires_at > $2
  AND u.id = l.user_id AND u.deactivated_at IS NULL
RETURNING l.user_id, l.purpose, u.email, u.display_name, u.role, u.clinic_id
"""
# A new link replaces the person's unused ones of the same purpose.
SPEND_LINKS = """
UPDATE user_links SET used_at = $3 WHERE user_id = $1 AND purpose = $2 AND used_at IS NULL
"""

INSERT_USER_TOKEN = """
INSERT INTO user_tokens (token_hash, user_id, created_at, expires_at, last_used_at)
VALUES ($1, $2, $3, $3::timestamptz + make_interval(secs => $4), $3)
"""
# $2 now, $3 the idle timeout (s).
USER_TOKEN = """
SELECT t.user_id, t.last_used_at, u.role, u.clinic_id, u.display_name
FROM user_tokens t JOIN users u ON u.id = t.user_id
WHERE t.token_hash = $1 AND t.expires_at > $2
  AND t.last_used_at > $2::timestamptz - make_interval(secs => $3) AND u.deactivated_at IS NULL
"""
TOUCH_USER_TOKEN = "UPDATE user_tokens SET last_used_at = $2 WHERE token_hash = $1"
END_USER_TOKEN = "DELETE FROM user_tokens WHERE token_hash = $1 RETURNING user_id"
DELETE_EXPIRED_USER_TOKENS = "DELETE FROM user_tokens WHERE expires_at <= $1"

# Wrong passwords of the email typed at this source in the window: count and the last one.
# $1 email, $2 source, $3 now, $4 window (s).
SIGNIN_FAILURES_HERE = """
SELECT count(*) AS failures, max(at) AS last_at FROM signin_failures
WHERE email = $1 AND source = $2 AND at > $3::timestamptz - make_interval(secs => $4)
"""
SIGNIN_FAILURES_EVERYWHERE = """
SELECT count(*) FROM signin_failures
WHERE email = $1 AND at > $2::timestamptz - make_interval(secs => $3)
"""
KNOWN_SOURCE = """
SELECT true FROM signin_sources s JOIN users u ON u.id = s.user_id
WHERE u.email = $1 AND s.source = $2
"""
# One wrong password (and forget everyone's older than the window).
RECORD_SIGNIN_FAILURE = """
WITH forgotten AS (
    DELETE FROM signin_failures WHERE at < $3::timestamptz - make_interval(secs => $4)
)
INSERT INTO signin_failures (email, source, at) VALUES ($1, $2, $3)
"""
SIGNED_IN = """
WITH forgiven AS (DELETE FROM signin_failures WHERE email = $1 AND source = $3)
INSERT INTO signin_sources (user_id, source, last_signed_in) VALUES ($2, $3, $4)
ON CONFLICT (user_id, source) DO UPDATE SET last_signed_in = EXCLUDED.last_signed_in
"""
REHASH_PASSWORD = "UPDATE users SET password_hash = $2 WHERE id = $1"

# --- clinics -------------------------------------------------------------------------------------

_CLINIC = "id, name, timezone, alert_settings, created_at"
INSERT_CLINIC = f"""
INSERT INTO clinics (name, timezone, alert_settings) VALUES ($1, $2, $3) RETURNING {_CLINIC}
"""
CLINIC = f"SELECT {_CLINIC} FROM clinics WHERE id = $1"
# $1 scope (NULL: every clinic), $2/$3 the cursor (name, id), $4 limit.
LIST_CLINICS = f"""
SELECT {_CLINIC} FROM clinics
WHERE ($1::uuid IS NULL OR id = $1)
  AND ($2::text IS NULL OR (name, id) > ($2, $3::uuid))
ORDER BY name, id
LIMIT $4
"""
CLINIC_EXISTS = "SELECT true FROM clinics WHERE id = $1"
CLINIC_TIMEZONE = "SELECT timezone FROM clinics WHERE id = $1"
NOTIFICATION_SETTINGS = "SELECT notification_settings FROM clinics WHERE id = $1"
UPDATE_NOTIFICATION_SETTINGS = """
UPDATE clinics SET notification_settings = $2 WHERE id = $1 RETURNING notification_settings
"""
UPDATE_ALERT_SETTINGS = f"""
UPDATE clinics SET alert_settings = $2 WHERE id = $1 RETURNING {_CLINIC}
"""

# --- patients ------------------------------------------------------------------------------------

_PATIENT = """
id, clinic_id, mrn, display_name, birth_date, withdrawal_risk, low_alarm_margin_ml, created_at
"""
INSERT_PATIENT = f"""
INSERT INTO patients (clinic_id, mrn, display_name, birth_date, withdrawal_risk,
                      low_alarm_margin_ml)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (clinic_id, mrn) DO NOTHING
RETURNING {_PATIENT}
"""
PATIENT = f"SELECT {_PATIENT} FROM patients WHERE id = $1"
# $2 scope, $3 the text searched for (NULL: all), $4/$5 the cursor (name, id), $6 limit.
LIST_PATIENTS = f"""
SELECT {_PATIENT} FROM patients
WHERE ($1::uuid IS NULL OR clinic_id = $1)
  AND ($2::text IS NULL OR strpos(lower(display_name), lower($2)) > 0
       OR strpos(lower(mrn), lower($2)) > 0)
  AND ($3::text IS NULL OR (display_name, id) > ($3, $4::uuid))
ORDER BY display_name, id
LIMIT $5
"""
# The web patient list: each listed patient's ($1) pump from the forecast read model
# (pump_forecasts, migration 0015, by its patient index), held by the scope's clinic ($2; NULL:
# every clinic), the greatest serial where a patient has several (the pump list's last). The
# holder, patient and booked visit are the pump's own, copied in the transaction that changes
# them; the deadline is the engine's, for a row that is not stale.
PATIENT_PUMPS = """
SELECT DISTINCT ON (patient_id) patient_id, serial, stale, refill_appointment_at,
       last_contact_at, deadline_at, deadline_reason
FROM pump_forecasts
WHERE patient_id = ANY($1::uuid[]) AND ($2::uuid IS NULL OR clinic_id = $2)
ORDER BY patient_id, serial DESC
"""

# --- pumps ---------------------------------------------------------------------------------------

_PUMP = """
SELECT p.serial, p.model AS registered_model, p.patient_id, p.implanted_on, p.first_seen_at,
       p.refill_appointment_at, p.clinic_id, s.msg_id,
       s.recorded_at, s.received_at, s.model, s.volume_ml, s.capacity_ml, s.low_alarm_ml,
       s.basis, s.drug_name, s.concentration_mcg_per_ml, s.infusion_mode, s.rate_ml_per_day,
       s.daily_dose_mcg, s.schedule, s.measured_flow_ml_per_day, s.battery_pct,
       s.battery_status, s.alarms, s.utc_offset_minutes
"""
_PUMP_JOINS = """
FROM pumps p
LEFT JOIN patients pt ON pt.id = p.patient_id
LEFT JOIN pump_state s ON s.serial = p.serial
"""
PUMP = f"{_PUMP}{_PUMP_JOINS} WHERE p.serial = $1"
# A pump's row of the forecast read model (pump_forecasts, migration 0015) and its unrecoverable
# gaps, beside _PUMP's columns; {now} is the request's time. The row is fresh when the engine
# wrote it as of the pump's current version and from its newest reading (a reading it has not
# evaluated yet leaves it behind) and that reading is not after {now}: the forecast is then the
# row's (services/api/views.py pump_states; the dashboard's the same way).
FORECAST_COLUMNS = """,
       (f.evaluated_version = f.version AND f.last_contact_at IS NOT DISTINCT FROM s.recorded_at
        AND s.recorded_at <= {now}) AS forecast_fresh,
       f.volume_ml AS f_volume_ml, f.low_alarm_ml AS f_low_alarm_ml,
       f.rate_ml_per_day AS f_rate_ml_per_day, f.basis AS f_basis, f.low_alarm_at AS f_low_alarm_at,
       f.empty_at AS f_empty_at, f.worst_case_empty_at AS f_worst_case_empty_at,
       f.deadline_at AS f_deadline_at, f.deadline_reason AS f_deadline_reason,
       f.state_at AS f_state_at, f.therapy AS f_therapy, f.zone AS f_zone,
       g.missing, g.missing_from, g.missing_until"""
_GAPS_JOIN = """
LEFT JOIN LATERAL (
    SELECT sum(last_missing - first_missing + 1) AS missing,
           min(before_at) AS missing_from, max(after_at) AS missing_until
    FROM sequence_gaps WHERE serial = p.serial AND state = 'unrecoverable'
) g ON true"""
FORECAST_JOINS = f"""
LEFT JOIN pump_forecasts f ON f.serial = p.serial{_GAPS_JOIN}"""
# The pump $1 with its read-model row as of $2 (now).
PUMP_STATE = f"""
{_PUMP}{FORECAST_COLUMNS.format(now="$2")}
{_PUMP_JOINS}{FORECAST_JOINS}
WHERE p.serial = $1
"""


def _pump_page(where: str, order: str, limit: str, now: str) -> str:
    """A page of pumps (``where``, in the order of an index on ``order``, ``limit``) with their
    state and read-model rows, read by key for the page's pumps only (LATERAL ... LIMIT 1: the
    generic plan, which cannot know the page is small, would otherwise merge or hash-join whole
    tables), so a page costs the same whatever the fleet's size or the cursor's place. (One
    statement for every case, with "$1 IS NULL OR", read, joined and sorted every pump.)"""
    return f"""
{_PUMP}{FORECAST_COLUMNS.format(now=now)}
FROM (SELECT * FROM pumps p WHERE {where} ORDER BY {order} LIMIT {limit}) p
LEFT JOIN LATERAL (SELECT * FROM pump_state WHERE serial = p.serial LIMIT 1) s ON true
LEFT JOIN LATERAL (SELECT * FROM pump_forecasts WHERE serial = p.serial LIMIT 1) f ON true
{_GAPS_JOIN}
ORDER BY p.serial
"""


# Every pump (admin, fleet; unassigned ones included) after the cursor $1 ('': from the first),
# $2 limit, read-model rows as of $3.
LIST_ALL_PUMPS = _pump_page("p.serial > $1", "p.serial", "$2", "$3")
# The pumps the clinic $1 holds now, after the cursor $2, $3 limit, as of $4 (by the index
# pumps_clinic_serial, migration 0021).
LIST_CLINIC_PUMPS = _pump_page(
    "p.clinic_id = $1 AND (p.clinic_id, p.serial) > ($1, $2)", "p.clinic_id, p.serial", "$3", "$4"
)
# The pumps of the patient $1 (of the clinic $2; NULL: any), after the cursor $3, $4 limit, as of
# $5 (a patient has a pump or two: by the patient's index).
LIST_PATIENT_PUMPS = _pump_page(
    "p.patient_id = $1 AND ($2::uuid IS NULL OR p.clinic_id = $2) AND p.serial > $3",
    "p.serial",
    "$4",
    "$5",
)
# The web claim/assign form's list: the clinic $1's pumps, those without a patient first.
CLINIC_PUMPS_FOR_FORM = """
SELECT serial, patient_id FROM pumps WHERE clinic_id = $1 ORDER BY patient_id IS NOT NULL, serial
"""
PUMP_CLINIC = "SELECT clinic_id, patient_id FROM pumps WHERE serial = $1"
HELD_EVER = "SELECT true FROM pump_assignments WHERE serial = $1 AND clinic_id = $2 LIMIT 1"
PUMP_FOR_CUSTODY = "SELECT clinic_id, patient_id FROM pumps WHERE serial = $1 FOR UPDATE"
# Who changes custody and how, for the history the pumps triggers write (migration 0008).
CUSTODY_CHANGE = """
SELECT set_config('pumpwatch.actor', $1, true), set_config('pumpwatch.custody', $2, true)
"""
# $3 clinic (NULL: nobody's), $4 patient (NULL: none) - the pump's holder from now on.
UPSERT_PUMP = """
INSERT INTO pumps (serial, model, clinic_id, patient_id, implanted_on)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (serial) DO UPDATE SET
    clinic_id = EXCLUDED.clinic_id,
    patient_id = EXCLUDED.patient_id,
    model = coalesce(EXCLUDED.model, pumps.model),
    implanted_on = coalesce(EXCLUDED.implanted_on, pumps.implanted_on)
RETURNING (xmax = 0) AS created
"""
# The pump's unresolved alerts, locked: a custody change hands them over (history, outbox).
UNRESOLVED_ALERTS_FOR_CUSTODY = """
SELECT id, serial, rule, priority, status, title, detail, facts, opened_at, updated_at,
       acknowledged_at, resolved_at, resolution
FROM alerts WHERE serial = $1 AND status <> 'resolved' ORDER BY opened_at, id FOR UPDATE
"""
# A clinic that takes a pump must look at its alerts again: acknowledged ones open again.
REOPEN_FOR_NEW_HOLDER = """
UPDATE alerts SET status = 'open', acknowledged_at = NULL, acknowledged_by = NULL,
       updated_at = $2
WHERE id = $1 AND status = 'acknowledged'
"""
INSERT_CUSTODY_HISTORY = """
INSERT INTO alert_history (alert_id, actor, action, from_status, to_status, from_priority,
                           to_priority, reason, facts)
VALUES ($1, $2, 'custody', $3, $3, $4, $4, $5, $6)
"""
# A claim code the pump's programmer showed: the newest claim event with this code, if it has
# not expired and was not used. $1 serial, $2 code, $3 now.
VALID_CLAIM = """
SELECT e.msg_id FROM events e
WHERE e.serial = $1 AND e.type = 'claim'
  AND upper(e.body ->> 'code') = upper($2)
  AND (e.body ->> 'expires_at')::timestamptz > $3
  AND NOT EXISTS (SELECT 1 FROM pump_claims c WHERE c.msg_id = e.msg_id)
ORDER BY e.recorded_at DESC
LIMIT 1
"""
USE_CLAIM = """
INSERT INTO pump_claims (msg_id, serial, used_at, clinic_id, actor) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (msg_id) DO NOTHING
RETURNING msg_id
"""
CLAIM_FAILURES = """
SELECT count(*) FROM claim_failures
WHERE serial = $1 AND at > $2::timestamptz - make_interval(secs => $3)
"""
INSERT_CLAIM_FAILURE = """
INSERT INTO claim_failures (serial, at, clinic_id, actor) VALUES ($1, $2, $3, $4)
"""
SET_APPOINTMENT = "UPDATE pumps SET refill_appointment_at = $2 WHERE serial = $1"
# Pumps of a scope (NULL: every clinic's, assigned or not) for the worklist.
PUMPS_OF = """
SELECT p.serial, coalesce(s.model, p.model) AS model, p.patient_id
FROM pumps p LEFT JOIN pump_state s ON s.serial = p.serial WHERE p.serial = ANY($1::text[])
"""
PATIENTS_BY_ID = f"SELECT {_PATIENT} FROM patients WHERE id = ANY($1::uuid[])"

# --- telemetry -----------------------------------------------------------------------------------

_READING = """
msg_id, recorded_at, received_at, utc_offset_minutes, seq, source_kind, source_id, model,
volume_ml, capacity_ml, low_alarm_ml, basis, drug_name, concentration_mcg_per_ml,
infusion_mode, rate_ml_per_day, daily_dose_mcg, schedule, measured_flow_ml_per_day,
battery_pct, battery_status, alarms
"""
# Newest first; $4/$5 the cursor (recorded_at, msg_id) of the last row of the previous page.
READINGS = f"""
SELECT {_READING} FROM readings
WHERE serial = $1 AND recorded_at >= $2 AND recorded_at < $3
  AND ($4::timestamptz IS NULL OR (recorded_at, msg_id) < ($4, $5::uuid))
  AND ($7::uuid IS NULL OR recorded_at <@ (SELECT held_periods($1, $7, NULL)))
ORDER BY recorded_at DESC, msg_id DESC
LIMIT $6
"""
# The CSV export: oldest first, read through a cursor. $4 scope as in READINGS.
READINGS_CSV = f"""
SELECT {_READING} FROM readings
WHERE serial = $1 AND recorded_at >= $2 AND recorded_at < $3
  AND ($4::uuid IS NULL OR recorded_at <@ (SELECT held_periods($1, $4, NULL)))
ORDER BY recorded_at, msg_id
"""
# An hourly bucket is a holder's when the whole hour was theirs. The periods are read once per
# query (a subquery that does not depend on the row), not once per hour.
_WHOLE_HOUR_HELD = """
tstzrange({hour}, {hour} + interval '1 hour')
    <@ (SELECT held_periods({serial}, {clinic}, {patient}))
"""
HOURLY = f"""
SELECT hour, readings, volume_ml_sum / readings AS volume_ml, volume_ml_min, volume_ml_max,
       last_volume_ml,
       CASE WHEN flow_readings > 0 THEN flow_ml_per_day_sum / flow_readings END
           AS measured_flow_ml_per_day,
       rate_ml_per_day_sum / readings AS rate_ml_per_day
FROM readings_hourly
WHERE serial = $1 AND hour >= $2 AND hour < $3 AND ($4::timestamptz IS NULL OR hour < $4)
  AND ($6::uuid IS NULL OR ({
    _WHOLE_HOUR_HELD.format(hour="hour", serial="$1", clinic="$6", patient="NULL")
}))
ORDER BY hour DESC
LIMIT $5
"""
# The dashboard's series as a JSON array, built here: 720 points would otherwise cost the API
# more CPU (720 rows decoded, validated and serialised) than the rest of the dashboard.
# The same format as the API's models: RFC 3339 UTC ``Z`` times, mL rounded to 3 decimals
# (float8 arithmetic and text: half the cost of json_agg with numeric rounding).
_SERIES_JSON = (
    """
SELECT '[' || coalesce(string_agg(
    '{"at":"' || to_char(h.hour AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
    || '","volume_ml":' || (round(h.volume_ml_sum / h.readings * 1000) / 1000)::text || '}',
    ',' ORDER BY h.hour
), '') || ']'
FROM readings_hourly h WHERE h.serial = p.serial AND h.hour >= $2 AND h.hour <= $3
  AND ("""
    + _WHOLE_HOUR_HELD.format(hour="h.hour", serial="p.serial", clinic="p.clinic_id", patient="$1")
    + ")\n"
)
# The dashboard's query (its pump, series, read-model row): services/api/sql_dashboard.py.

# --- events (refills over HTTP take ingest's path: the ledger, events, NOTIFY) -------------------

STORE_EVENT = """
WITH new AS (
    INSERT INTO ingested_messages (msg_id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING msg_id
)
INSERT INTO events (msg_id, serial, type, recorded_at, received_at, seq, source_kind, source_id,
                    body, payload)
SELECT msg_id, $2, $3, $4, now(), NULL, $5, $6, $7, $8 FROM new
RETURNING msg_id
"""
EVENT = "SELECT serial, type, recorded_at FROM events WHERE msg_id = $1"
REFILL_TIMES = """
SELECT recorded_at FROM events
WHERE serial = $1 AND type = 'refill' AND ($2::timestamptz IS NULL OR recorded_at < $2)
  AND ($4::uuid IS NULL OR recorded_at <@ (SELECT held_periods($1, $4, NULL)))
ORDER BY recorded_at DESC LIMIT $3
"""

# --- alerts --------------------------------------------------------------------------------------

# The owner of an alert is its pump's holder: now while unresolved, when it resolved after.
_ALERT = """
id, serial, alert_patient(serial, resolved_at) AS patient_id,
alert_clinic(serial, resolved_at) AS clinic_id, rule, condition, priority, status, title, detail,
facts, opened_at, updated_at, acknowledged_at, actor_json(acknowledged_by) AS acknowledged_by,
resolved_at, actor_json(resolved_by) AS resolved_by, resolution, snoozed_until,
actor_json(snoozed_by) AS snoozed_by, snooze_note
"""
# The clinic that holds (held) an alert's pump: now while unresolved, when it resolved after.
# It is alert_clinic(serial, resolved_at) written as a subquery, which runs inside the plan by
# the (serial, since) index: calling the function cost ~15 µs a row, for every alert a clinic's
# list looked at.
_ALERT_CLINIC = """(
    SELECT pa.clinic_id FROM pump_assignments pa
    WHERE pa.serial = alerts.serial AND pa.since <= coalesce(alerts.resolved_at, 'infinity')
      AND (pa.until IS NULL OR pa.until > coalesce(alerts.resolved_at, 'infinity'))
    ORDER BY pa.since DESC
    LIMIT 1)"""
# Alerts a clinic may hold: of pumps it held at some time (the index narrows, the owner decides).
_CLINIC_ALERTS = f"""
($1::uuid IS NULL OR (serial IN (SELECT serial FROM pump_assignments WHERE clinic_id = $1)
                      AND {_ALERT_CLINIC} = $1))
"""
ALERT = f"SELECT {_ALERT} FROM alerts WHERE id = $1"
_ALERT_FILTERS = """
  AND ($2::text IS NULL OR status = $2)
  AND ($3::text IS NULL OR priority = $3)
  AND ($4::text IS NULL OR serial = $4)
  AND ($5::uuid IS NULL OR alert_patient(serial, resolved_at) = $5)
  AND ($6::timestamptz IS NULL OR (opened_at, id) < ($6, $7::uuid))
ORDER BY opened_at DESC, id DESC
LIMIT $8
"""
# Every clinic's alerts ($1 NULL: unassigned pumps' included), filters $2..$5, cursor $6/$7,
# $8 limit.
LIST_ALERTS = f"SELECT {_ALERT} FROM alerts WHERE {_CLINIC_ALERTS} {_ALERT_FILTERS}"
# One clinic's ($1): the pumps it held, as an array computed once, then their alerts by the
# (serial, opened_at) index (migration 0019), so the list reads that clinic's history and nobody
# else's however large the fleet grows (a statement of its own: with "$1 IS NULL OR" a generic
# plan scans every alert; with "serial IN (…)" it ran the holder's subquery on every alert).
LIST_CLINIC_ALERTS = f"""
SELECT {_ALERT} FROM alerts
WHERE serial = ANY (ARRAY(SELECT DISTINCT serial FROM pump_assignments WHERE clinic_id = $1))
  AND {_ALERT_CLINIC} = $1
{_ALERT_FILTERS}"""
OPEN_ALERTS_OF = f"""
SELECT {_ALERT} FROM alerts WHERE serial = ANY($1::text[]) AND status <> 'resolved'
ORDER BY serial, opened_at DESC
"""
ALERT_HISTORY = """
SELECT at, actor_json(actor) AS actor, action, from_status, to_status, from_priority,
       to_priority, reason
FROM alert_history WHERE alert_id = $1 ORDER BY id
"""
ACKNOWLEDGE = f"""
UPDATE alerts SET status = 'acknowledged', acknowledged_at = now(), acknowledged_by = $2,
       updated_at = now()
WHERE id = $1 AND status = 'open'
RETURNING {_ALERT}
"""
RESOLVE = f"""
UPDATE alerts SET status = 'resolved', resolved_at = now(), resolved_by = $2, resolution = $3,
       updated_at = now()
WHERE id = $1 AND status <> 'resolved'
RETURNING {_ALERT}
"""
INSERT_HISTORY = """
INSERT INTO alert_history (alert_id, actor, action, from_status, to_status, from_priority,
                           to_priority, reason)
VALUES ($1, $2, $3, $4, $5, $6, $6, $7)
"""
SNOOZE = f"""
UPDATE alerts SET snoozed_until = $2, snoozed_by = $3, snooze_note = $4, updated_at = now()
WHERE id = $1 AND status <> 'resolved'
RETURNING {_ALERT}
"""

# --- webhooks (delivered by the alert service's notification worker) ----------------------------

_WEBHOOK = "id, clinic_id, url, events, created_at, disabled_at, disabled_reason"
INSERT_WEBHOOK = f"""
INSERT INTO webhooks (clinic_id, url, events, secret, created_by)
VALUES ($1, $2, $3, $4, $5) RETURNING {_WEBHOOK}
"""
LIST_WEBHOOKS = f"""
SELECT {_WEBHOOK} FROM webhooks
WHERE deleted_at IS NULL AND ($1::uuid IS NULL OR clinic_id = $1)
  AND ($2::uuid IS NULL OR id > $2)
ORDER BY id LIMIT $3
"""
ROTATE_WEBHOOK_SECRET = f"""
UPDATE webhooks SET previous_secret = secret, secret = $3,
       previous_secret_expires_at = now() + make_interval(secs => $4)
WHERE id = $1 AND deleted_at IS NULL AND ($2::uuid IS NULL OR clinic_id = $2)
RETURNING {_WEBHOOK}
"""
DELETE_WEBHOOK = """
UPDATE webhooks SET deleted_at = now()
WHERE id = $1 AND deleted_at IS NULL AND ($2::uuid IS NULL OR clinic_id = $2)
RETURNING id, clinic_id
"""

# --- quarantine ----------------------------------------------------------------------------------

LIST_QUARANTINE = """
SELECT id, topic, reason, detail, payload_bytes, first_received_at, last_received_at,
       occurrences, substring(payload FROM 1 FOR 2048) AS excerpt
FROM quarantine
WHERE ($1::text IS NULL OR reason = $1) AND ($2::bigint IS NULL OR id < $2)
ORDER BY id DESC LIMIT $3
"""

# --- health --------------------------------------------------------------------------------------

PING = "SELECT 1"

# --- notifications (tables of the alert service's delivery worker, migration 0003) -------------

HAS_DELIVERIES = "SELECT to_regclass('deliveries') IS NOT NULL"
ALERT_DELIVERIES = """
SELECT channel, target, status, attempts, created_at, delivered_at
FROM deliveries WHERE alert_id = $1 ORDER BY created_at, id
"""

# --- web sessions --------------------------------------------------------------------------------

# A key's session or a person's ($7); $8 now (the API's clock).
INSERT_SESSION = """
INSERT INTO web_sessions (token_hash, key_id, role, clinic_id, csrf_token, expires_at, user_id,
                          created_at, last_used_at)
VALUES ($1, $2, $3, $4, $5, $8::timestamptz + make_interval(secs => $6), $7, $8, $8)
"""
# A key's session while the key is not revoked; a person's while the person is active and has
# not been idle for $3 s (their role and clinic as they are now). $2 now.
SESSION = """
SELECT s.key_id, s.user_id, coalesce(u.role, s.role) AS role,
       CASE WHEN s.user_id IS NULL THEN s.clinic_id ELSE u.clinic_id END AS clinic_id,
       s.csrf_token, s.expires_at, s.last_used_at, coalesce(u.display_name, k.label) AS name
FROM web_sessions s
LEFT JOIN api_keys k ON k.id = s.key_id
LEFT JOIN users u ON u.id = s.user_id
WHERE s.token_hash = $1 AND s.expires_at > $2
  AND CASE WHEN s.user_id IS NULL THEN k.revoked_at IS NULL AND k.id IS NOT NULL
           ELSE u.deactivated_at IS NULL
                AND s.last_used_at > $2::timestamptz - make_interval(secs => $3)
      END
"""
TOUCH_SESSION = "UPDATE web_sessions SET last_used_at = $2 WHERE token_hash = $1"
DELETE_SESSION = "DELETE FROM web_sessions WHERE token_hash = $1 RETURNING user_id"
DELETE_EXPIRED_SESSIONS = "DELETE FROM web_sessions WHERE expires_at <= $1"

# --- fleet overview (de-identified) --------------------------------------------------------------

FLEET = """
SELECT g.model, g.firmware, g.pumps, g.reporting, g.silent, g.with_alarms,
       coalesce(a.alarms, '{}') AS alarms
FROM (
    SELECT coalesce(s.model, p.model, 'unknown') AS model,
           coalesce(s.source_firmware, 'unknown') AS firmware,
           count(*) AS pumps,
           count(*) FILTER (WHERE s.recorded_at > now() - interval '24 hours') AS reporting,
           count(*) FILTER (
               WHERE s.recorded_at IS NULL OR s.recorded_at <= now() - interval '24 hours')
               AS silent,
           count(*) FILTER (WHERE cardinality(s.alarms) > 0) AS with_alarms
    FROM pumps p
    LEFT JOIN pump_state s ON s.serial = p.serial
    GROUP BY 1, 2
) g
LEFT JOIN (
    SELECT coalesce(s.model, p.model, 'unknown') AS model,
           coalesce(s.source_firmware, 'unknown') AS firmware,
           array_agg(DISTINCT a.alarm) AS alarms
    FROM pump_state s
    JOIN pumps p ON p.serial = s.serial
    CROSS JOIN LATERAL unnest(s.alarms) AS a(alarm)
    WHERE cardinality(s.alarms) > 0 AND a.alarm IS NOT NULL
    GROUP BY 1, 2
) a ON a.model = g.model AND a.firmware = g.firmware
ORDER BY 1, 2
"""

# Pumps with messages lost for good: the gaps backfill gave up on (``unrecoverable``), as the
# pump state's ``unrecovered_gaps`` counts them (services/storage/sql.py OPEN_GAPS), for the
# whole fleet. Serials only: the fleet page is de-identified.
FLEET_UNRECOVERED_GAPS = """
SELECT g.serial, coalesce(s.model, p.model, 'unknown') AS model,
       sum(g.last_missing - g.first_missing + 1) AS missing,
       min(g.before_at) AS missing_from, max(g.after_at) AS missing_until,
       min(g.unrecoverable_at) AS given_up_at
FROM sequence_gaps g
LEFT JOIN pumps p ON p.serial = g.serial
LEFT JOIN pump_state s ON s.serial = g.serial
WHERE g.state = 'unrecoverable'
GROUP BY g.serial, 2
ORDER BY missing DESC, g.serial
"""
