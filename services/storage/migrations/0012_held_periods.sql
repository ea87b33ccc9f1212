-- What a clinic (and, if given, one of its patients) held of one pump, as one multirange. A
-- query that limits a pump's rows to the reader's periods takes it once, as an uncorrelated
-- subquery (an InitPlan), and tests each row with <@: asking pump_assignments once per row
-- (held_by) cost a dashboard's 720 hourly points 1,440 index probes, most of its PostgreSQL
-- time. Adjacent periods of the same holder merge, so an hour that spans a move between two
-- patients of one clinic is that clinic's whole.
CREATE FUNCTION held_periods(p_serial text, p_clinic uuid, p_patient uuid)
RETURNS tstzmultirange
LANGUAGE sql STABLE AS $$
    SELECT coalesce(range_agg(tstzrange(since, until, '[)')), '{}'::tstzmultirange)
    FROM pump_assignments
    WHERE serial = p_serial AND clinic_id = p_clinic
      AND (p_patient IS NULL OR patient_id = p_patient)
$$;

DROP FUNCTION held_by(text, timestamptz, uuid, uuid);
