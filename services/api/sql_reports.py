"""The SQL of the patient report and the patient page's therapy and alert history (a module of
its own: ``sql.py`` is at its size limit). Parameters only; nothing is built from input.

Custody as in ``sql.py``: a patient's report holds a pump's rows only for the periods in which
the pump was that patient's in the patient's clinic (``held_periods``, migration 0012).
"""

from services.api.sql import _ALERT

# The pumps the patient ($1) had in the clinic ($2) at some time in [$3, $4), each with the part
# of the period that was theirs (since NULL: from the beginning).
PATIENT_PUMPS = """
SELECT serial, nullif(min(greatest(since, $3)), '-infinity') AS since,
       max(least(coalesce(until, $4), $4)) AS until
FROM pump_assignments
WHERE patient_id = $1 AND clinic_id = $2 AND since < $4 AND (until IS NULL OR until > $3)
GROUP BY serial
ORDER BY min(since), serial
"""

# The pump's ($1) program as its readings reported it, one row per change (drug, concentration,
# mode or daily dose; the first reading read too), from $5 to before $4, in the periods the
# clinic ($2) and patient ($3) held it. The daily dose is the programmed one, else rate x
# concentration.
THERAPY_CHANGES = """
SELECT recorded_at, drug_name, concentration_mcg_per_ml, infusion_mode, rate_ml_per_day, dose
FROM (
    SELECT recorded_at, drug_name, concentration_mcg_per_ml, infusion_mode, rate_ml_per_day,
           dose,
           lag(drug_name) OVER w AS before_drug,
           lag(concentration_mcg_per_ml) OVER w AS before_concentration,
           lag(infusion_mode) OVER w AS before_mode,
           lag(dose) OVER w AS before_dose,
           row_number() OVER w AS n
    FROM (
        SELECT recorded_at, msg_id, drug_name, concentration_mcg_per_ml, infusion_mode,
               rate_ml_per_day,
               round(coalesce(daily_dose_mcg, rate_ml_per_day * concentration_mcg_per_ml)
                     ::numeric, 3)::float8 AS dose
        FROM readings
        WHERE serial = $1 AND recorded_at >= $5 AND recorded_at < $4
          AND recorded_at <@ (SELECT held_periods($1, $2, $3))
    ) r
    WINDOW w AS (ORDER BY recorded_at, msg_id)
) c
WHERE n = 1 OR drug_name IS DISTINCT FROM before_drug
   OR concentration_mcg_per_ml IS DISTINCT FROM before_concentration
   OR infusion_mode IS DISTINCT FROM before_mode OR dose IS DISTINCT FROM before_dose
ORDER BY recorded_at
"""

# The pump's ($1) refills in [$4, $5) in the periods the clinic ($2) and patient ($3) held it,
# newest first, at most $6.
PATIENT_REFILL_TIMES = """
SELECT recorded_at FROM events
WHERE serial = $1 AND type = 'refill' AND recorded_at >= $4 AND recorded_at < $5
  AND recorded_at <@ (SELECT held_periods($1, $2, $3))
ORDER BY recorded_at DESC
LIMIT $6
"""

# The patient's ($1) alerts in the clinic ($2), of their pumps ($3), open at some time in
# [$4, $5): an unresolved alert is the pump's holder's now, a resolved one its holder's when it
# resolved. Newest first, at most $6.
PATIENT_ALERTS = f"""
SELECT {_ALERT} FROM alerts
WHERE serial = ANY($3::text[])
  AND alert_patient(serial, resolved_at) = $1 AND alert_clinic(serial, resolved_at) = $2
  AND opened_at < $5 AND (resolved_at IS NULL OR resolved_at >= $4)
ORDER BY opened_at DESC, id DESC
LIMIT $6
"""

# The history of several alerts at once, oldest first per alert.
ALERTS_HISTORY = """
SELECT alert_id, at, actor_json(actor) AS actor, action, from_status, to_status, from_priority,
       to_priority, reason
FROM alert_history WHERE alert_id = ANY($1::uuid[]) ORDER BY alert_id, id
"""

CLINIC = "SELECT name, timezone, alert_settings FROM clinics WHERE id = $1"
