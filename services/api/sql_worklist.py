"""SQL of the refill worklist, read from the alert engine's read model (``pump_forecasts``,
migration 0015; services/api/worklist.py). Parameterised; the rest of the API's SQL is in
services/api/sql.py."""

# Fresh rows only (a stale row's pump is computed by the API): by deadline, then serial, after
# the cursor ($3, $4; '-infinity' and '' for the first page), up to $2 (the horizon); with the
# patient, and on every row the serials of the scope's stale rows (one round trip; the STALE
# statements alone when the page is empty).
_WORKLIST_ROW = """
x.stale, f.serial, f.deadline_at, f.deadline_reason, f.low_alarm_at, f.state_at, f.volume_ml,
f.therapy, f.zone, f.drug_name, f.last_refill_at, p.refill_appointment_at, p.patient_id,
coalesce(s.model, p.model) AS model, pt.clinic_id AS patient_clinic_id, pt.mrn,
pt.display_name, pt.birth_date, pt.withdrawal_risk, pt.low_alarm_margin_ml,
pt.created_at AS patient_created_at
"""
_WORKLIST_JOINS = """
JOIN pumps p ON p.serial = f.serial
LEFT JOIN pump_state s ON s.serial = f.serial
LEFT JOIN patients pt ON pt.id = p.patient_id
"""
WORKLIST_STALE_CLINIC = """
SELECT coalesce(array_agg(serial), '{}') FROM pump_forecasts WHERE clinic_id = $1 AND stale
"""
WORKLIST_STALE_ALL = "SELECT coalesce(array_agg(serial), '{}') FROM pump_forecasts WHERE stale"
WORKLIST_CLINIC = f"""
SELECT {_WORKLIST_ROW}
FROM ({WORKLIST_STALE_CLINIC}) AS x(stale)
CROSS JOIN pump_forecasts f {_WORKLIST_JOINS}
WHERE f.clinic_id = $1 AND NOT f.stale
  AND f.deadline_at <= $2 AND (f.deadline_at, f.serial) > ($3::timestamptz, $4::text)
ORDER BY f.deadline_at, f.serial
LIMIT $5
"""
WORKLIST_ALL = f"""
SELECT {_WORKLIST_ROW}
FROM ({WORKLIST_STALE_ALL}) AS x(stale)
CROSS JOIN pump_forecasts f {_WORKLIST_JOINS}
WHERE NOT f.stale
  AND f.deadline_at <= $1 AND (f.deadline_at, f.serial) > ($2::timestamptz, $3::text)
ORDER BY f.deadline_at, f.serial
LIMIT $4
"""
# The page's unresolved alerts, as OPEN_ALERTS_OF answers them: an unresolved alert is its
# pump's holder's now (alert_clinic and alert_patient at 'infinity'), which is the pump's row.
WORKLIST_ALERTS = """
SELECT a.id, a.serial, p.patient_id, p.clinic_id, a.rule, a.condition, a.priority, a.status,
       a.title, a.detail, a.facts, a.opened_at, a.updated_at, a.acknowledged_at,
       actor_json(a.acknowledged_by) AS acknowledged_by, a.resolved_at,
       actor_json(a.resolved_by) AS resolved_by, a.resolution, a.snoozed_until,
       actor_json(a.snoozed_by) AS snoozed_by, a.snooze_note
FROM alerts a JOIN pumps p ON p.serial = a.serial
WHERE a.serial = ANY($1::text[]) AND a.status <> 'resolved'
ORDER BY a.serial, a.opened_at DESC
"""

# The same page with each pump's unresolved alerts in the row (``alerts``: an array of records,
# WORKLIST_ALERTS's columns in its order; jsonb as json, which records decode as text), the
# page's pumps picked from the index before anything is joined: one round trip, for the API's
# JSON answer (worklist.page_json).
_ALERT_RECORD = """
SELECT array_agg(ROW(
    a.id, a.serial, p.patient_id, p.clinic_id, a.rule, a.condition, a.priority, a.status,
    a.title, a.detail, a.facts::json, a.opened_at, a.updated_at, a.acknowledged_at,
    CASE WHEN a.acknowledged_by IS NOT NULL THEN actor_json(a.acknowledged_by)::json END,
    a.resolved_at,
    CASE WHEN a.resolved_by IS NOT NULL THEN actor_json(a.resolved_by)::json END,
    a.resolution, a.snoozed_until,
    CASE WHEN a.snoozed_by IS NOT NULL THEN actor_json(a.snoozed_by)::json END, a.snooze_note
) ORDER BY a.opened_at DESC)
FROM alerts a WHERE a.serial = f.serial AND a.status <> 'resolved'
"""
# The program as its two numbers, and whole (as JSON) only for a program with steps (the
# projection needs them; the rest of the page needs no JSON decoded).
_WORKLIST_PAGE_ROW = _WORKLIST_ROW.replace(
    "f.therapy,",
    """f.therapy IS NOT NULL AS programmed,
(f.therapy ->> 'rate_ml_per_day')::float8 AS rate_ml_per_day,
(f.therapy ->> 'concentration_mcg_per_ml')::float8 AS concentration_mcg_per_ml,
CASE WHEN jsonb_typeof(f.therapy -> 'schedule') = 'array'
      AND jsonb_array_length(f.therapy -> 'schedule') > 0 THEN f.therapy END AS stepped,""",
)
_WORKLIST_PAGE = """
SELECT {row}, ({alerts}) AS alerts
FROM ({stale}) AS x(stale)
CROSS JOIN (
    SELECT * FROM pump_forecasts
    WHERE {scope} NOT stale
      AND deadline_at <= ${h} AND (deadline_at, serial) > (${h1}::timestamptz, ${h2}::text)
    ORDER BY deadline_at, serial
    LIMIT ${n}
) f {joins}
ORDER BY f.deadline_at, f.serial
"""
# The pump by its key for each of the page's rows (OFFSET 0 keeps the planner from turning it
# into a hash join over every pump), and actor_json only where there is an actor (most alerts
# have none: a call each costs more than the rest of the record).
_WORKLIST_PAGE_JOINS = """
CROSS JOIN LATERAL (SELECT * FROM pumps WHERE serial = f.serial OFFSET 0) p
LEFT JOIN pump_state s ON s.serial = f.serial
LEFT JOIN patients pt ON pt.id = p.patient_id
"""
WORKLIST_PAGE_CLINIC = _WORKLIST_PAGE.format(
    row=_WORKLIST_PAGE_ROW,
    alerts=_ALERT_RECORD,
    stale=WORKLIST_STALE_CLINIC,
    scope="clinic_id = $1 AND",
    joins=_WORKLIST_PAGE_JOINS,
    h=2,
    h1=3,
    h2=4,
    n=5,
)
WORKLIST_PAGE_ALL = _WORKLIST_PAGE.format(
    row=_WORKLIST_PAGE_ROW,
    alerts=_ALERT_RECORD,
    stale=WORKLIST_STALE_ALL,
    scope="",
    joins=_WORKLIST_PAGE_JOINS,
    h=1,
    h1=2,
    h2=3,
    n=4,
)
