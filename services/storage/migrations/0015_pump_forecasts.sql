-- The read model of the refill worklist (issue 20): each pump's forecast as the alert engine
-- last computed it, written in the transaction of its alert changes, so that the worklist (and
-- what else shows deadlines) reads one indexed table instead of building a snapshot and a
-- forecast of every pump in every request.
--
-- Freshness: `version` counts the changes to what the forecast depends on that reach the pump
-- outside the engine's own evaluation (a custody change: another clinic's zone and settings; a
-- refill; a patient's margin or risk; the clinic's settings or zone), bumped by the triggers
-- below in the transaction that makes the change, whoever writes it. The engine records the
-- version it read before loading the snapshot it computed from (`evaluated_version`). A row
-- whose two differ is stale: readers compute that pump's forecast themselves until the engine
-- has been again. A pump is given a stale row when it is created, so a pump the engine has
-- not evaluated yet is never missing from the worklist. New readings reach the row through
-- the engine (ingest wakes it; it evaluates within a second, as it raises the alerts).
--
-- Custody: clinic_id, patient_id and refill_appointment_at are the pump's own, copied by the
-- trigger on pumps in the same transaction (the engine never writes them on an existing row),
-- so the row never shows a clinic a pump it no longer holds.
CREATE TABLE pump_forecasts (
    serial                 text PRIMARY KEY REFERENCES pumps (serial),
    clinic_id              uuid,
    patient_id             uuid,
    refill_appointment_at  timestamptz,
    version                bigint NOT NULL DEFAULT 1,
    evaluated_version      bigint NOT NULL DEFAULT 0,
    -- A column of its own (not the comparison in each query) so that the planner has
    -- statistics of it: few rows are stale, and their index is the way to them.
    stale                  boolean GENERATED ALWAYS AS (evaluated_version <> version) STORED,
    evaluated_at           timestamptz,
    -- The newest reading (last contact) and the state the projection starts from (the latest
    -- reading, or a refill recorded after it) with its therapy and the zone flex steps run in.
    last_contact_at        timestamptz,
    state_at               timestamptz,
    volume_ml              double precision,
    low_alarm_ml           double precision,
    rate_ml_per_day        double precision,
    basis                  text,
    drug_name              text,
    therapy                jsonb,
    zone                   text,
    low_alarm_at           timestamptz,
    empty_at               timestamptz,
    worst_case_empty_at    timestamptz,
    -- The effective refill deadline (services/domain/rules/deadlines.py) and its reason.
    deadline_at            timestamptz,
    deadline_reason        text,
    last_refill_at         timestamptz,
    -- The pump's unresolved alerts when the engine wrote the row.
    open_alerts            integer NOT NULL DEFAULT 0,
    highest_priority       text
);

-- The worklist: fresh rows by deadline, a clinic's and everyone's.
CREATE INDEX pump_forecasts_due ON pump_forecasts (deadline_at, serial) WHERE NOT stale;
CREATE INDEX pump_forecasts_clinic_due ON pump_forecasts (clinic_id, deadline_at, serial)
    WHERE NOT stale;
-- What readers compute themselves: few at a time while the engine runs.
CREATE INDEX pump_forecasts_stale ON pump_forecasts (clinic_id) WHERE stale;
CREATE INDEX pump_forecasts_patient ON pump_forecasts (patient_id) WHERE patient_id IS NOT NULL;

INSERT INTO pump_forecasts (serial, clinic_id, patient_id, refill_appointment_at)
SELECT serial, clinic_id, patient_id, refill_appointment_at FROM pumps;

CREATE FUNCTION pump_forecasts_pump() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pump_forecasts (serial, clinic_id, patient_id, refill_appointment_at)
        VALUES (NEW.serial, NEW.clinic_id, NEW.patient_id, NEW.refill_appointment_at)
        ON CONFLICT (serial) DO UPDATE
            SET clinic_id = EXCLUDED.clinic_id, patient_id = EXCLUDED.patient_id,
                refill_appointment_at = EXCLUDED.refill_appointment_at,
                version = pump_forecasts.version + 1;
    ELSE
        UPDATE pump_forecasts
        SET clinic_id = NEW.clinic_id, patient_id = NEW.patient_id,
            refill_appointment_at = NEW.refill_appointment_at,
            version = version + CASE
                WHEN NEW.clinic_id IS DISTINCT FROM OLD.clinic_id
                  OR NEW.patient_id IS DISTINCT FROM OLD.patient_id THEN 1 ELSE 0 END
        WHERE serial = NEW.serial;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER pumps_forecast AFTER INSERT OR UPDATE OF clinic_id, patient_id,
    refill_appointment_at ON pumps
    FOR EACH ROW EXECUTE FUNCTION pump_forecasts_pump();

-- Once per statement (ingest stores a batch's events in one), the rows in serial order as the
-- engine locks its batch: a batch with refills of several pumps cannot deadlock with it.
CREATE FUNCTION pump_forecasts_refill() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pump_forecasts SET version = version + 1
    WHERE serial IN (SELECT f.serial FROM pump_forecasts f
                     WHERE f.serial IN (SELECT serial FROM new_events WHERE type = 'refill')
                     ORDER BY f.serial FOR UPDATE);
    RETURN NULL;
END
$$;

CREATE TRIGGER events_refill_forecast AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION pump_forecasts_refill();

CREATE FUNCTION pump_forecasts_patient() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.withdrawal_risk IS DISTINCT FROM OLD.withdrawal_risk
       OR NEW.low_alarm_margin_ml IS DISTINCT FROM OLD.low_alarm_margin_ml THEN
        UPDATE pump_forecasts SET version = version + 1
        WHERE serial IN (SELECT serial FROM pump_forecasts WHERE patient_id = NEW.id
                         ORDER BY serial FOR UPDATE);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER patients_forecast AFTER UPDATE OF withdrawal_risk, low_alarm_margin_ml
    ON patients FOR EACH ROW EXECUTE FUNCTION pump_forecasts_patient();

CREATE FUNCTION pump_forecasts_clinic() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.alert_settings IS DISTINCT FROM OLD.alert_settings
       OR NEW.timezone IS DISTINCT FROM OLD.timezone THEN
        -- In serial order, as the engine locks its batch (no deadlock with it).
        UPDATE pump_forecasts SET version = version + 1
        WHERE serial IN (SELECT serial FROM pump_forecasts WHERE clinic_id = NEW.id
                         ORDER BY serial FOR UPDATE);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER clinics_forecast AFTER UPDATE OF alert_settings, timezone ON clinics
    FOR EACH ROW EXECUTE FUNCTION pump_forecasts_clinic();

-- Who held a pump when (pump_holder, and so alert_clinic and alert_patient on every alert the
-- worklist, the alert list and the dashboard show): by serial, newest period first, instead of
-- a scan of every pump's periods for each alert (1 ms each at 10,000 pumps).
CREATE INDEX pump_assignments_serial_since ON pump_assignments (serial, since DESC);
