"""SQL of the FHIR R4 interface (services/api/fhir/). Parameterised, with the tenancy of
services/api/sql.py (``$scope``: a clinic id, or NULL for the roles that see every clinic); the
rest of the API's SQL is there."""

from services.api.sql import _ALERT, _CLINIC_ALERTS, _PATIENT

# A pump's readings for Observations, newest first. $4/$5: the reading a page resumes at
# (inclusive: a page may end within a reading's Observations). $6..$8: whether volume or rate,
# the dose, the battery is wanted; only readings with a wanted value are returned.
FHIR_READINGS = """
SELECT msg_id, recorded_at, received_at, volume_ml, rate_ml_per_day, daily_dose_mcg, battery_pct
FROM readings
WHERE serial = $1 AND recorded_at >= $2 AND recorded_at < $3
  AND ($4::timestamptz IS NULL OR (recorded_at, msg_id) <= ($4, $5::uuid))
  AND ($6::boolean OR ($7::boolean AND daily_dose_mcg IS NOT NULL)
       OR ($8::boolean AND battery_pct IS NOT NULL))
  AND ($10::uuid IS NULL OR recorded_at <@ (SELECT held_periods($1, $10, NULL)))
ORDER BY recorded_at DESC, msg_id DESC
LIMIT $9
"""
# One reading by its serial, time and the start of its id (an Observation id); $4 scope.
FHIR_READING = """
SELECT msg_id, recorded_at, received_at, volume_ml, rate_ml_per_day, daily_dose_mcg, battery_pct
FROM readings
WHERE serial = $1 AND recorded_at = $2 AND left(replace(msg_id::text, '-', ''), 8) = $3
  AND ($4::uuid IS NULL OR recorded_at <@ (SELECT held_periods($1, $4, NULL)))
ORDER BY msg_id
LIMIT 1
"""
# How many Observations a search finds: $1..$3 as FHIR_READINGS, $4..$7 whether volume, rate,
# dose, battery are wanted, $8 scope.
FHIR_OBSERVATIONS_TOTAL = """
SELECT coalesce(sum($4::int + $5::int + ($6::boolean AND daily_dose_mcg IS NOT NULL)::int
                    + ($7::boolean AND battery_pct IS NOT NULL)::int), 0)
FROM readings
WHERE serial = $1 AND recorded_at >= $2 AND recorded_at < $3
  AND ($8::uuid IS NULL OR recorded_at <@ (SELECT held_periods($1, $8, NULL)))
"""
# The pump's periods of custody, each with its patient (since NULL: from the beginning).
PUMP_PERIODS = """
SELECT nullif(since, '-infinity') AS since, until, patient_id
FROM pump_assignments WHERE serial = $1 ORDER BY id
"""
# Unresolved alerts (Flags): $1 scope (NULL: every clinic's and unassigned pumps'), $2 serial,
# $3 patient, $4/$5 the cursor (opened_at, id) of the last row of the previous page, $6 limit.
FHIR_UNRESOLVED_ALERTS = f"""
SELECT {_ALERT} FROM alerts
WHERE status <> 'resolved'
  AND {_CLINIC_ALERTS}
  AND ($2::text IS NULL OR serial = $2)
  AND ($3::uuid IS NULL OR alert_patient(serial, resolved_at) = $3)
  AND ($4::timestamptz IS NULL OR (opened_at, id) < ($4, $5::uuid))
ORDER BY opened_at DESC, id DESC
LIMIT $6
"""

# Patients for FHIR search: $1 scope, $2 MRN, $3 the MRN's clinic, $4 the start of the name or
# of a word of it (case-insensitive); then the cursor $5/$6 (name, id) and $7 limit.
_FHIR_PATIENT_MATCH = """
($1::uuid IS NULL OR clinic_id = $1)
  AND ($2::text IS NULL OR mrn = $2)
  AND ($3::uuid IS NULL OR clinic_id = $3)
  AND ($4::text IS NULL OR starts_with(lower(display_name), lower($4))
       OR strpos(lower(display_name), ' ' || lower($4)) > 0)
"""
FHIR_PATIENTS = f"""
SELECT {_PATIENT} FROM patients
WHERE {_FHIR_PATIENT_MATCH}
  AND ($5::text IS NULL OR (display_name, id) > ($5, $6::uuid))
ORDER BY display_name, id
LIMIT $7
"""
FHIR_PATIENTS_TOTAL = f"SELECT count(*) FROM patients WHERE {_FHIR_PATIENT_MATCH}"

FHIR_UNRESOLVED_ALERTS_TOTAL = f"""
SELECT count(*) FROM alerts
WHERE status <> 'resolved'
  AND {_CLINIC_ALERTS}
  AND ($2::text IS NULL OR serial = $2)
  AND ($3::uuid IS NULL OR alert_patient(serial, resolved_at) = $3)
"""
