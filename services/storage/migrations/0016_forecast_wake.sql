-- A change to a patient's margin or risk, or to a clinic's alert settings or zone, wakes the
-- alert engine for the pumps whose forecasts it made stale (issue 20): the triggers of 0015
-- bump those rows' versions; these also NOTIFY pumpwatch_ingest with their serials, as
-- services/storage/channels.py's pumps_changed does, so the engine re-evaluates them within a
-- second of the commit instead of at its next sweep (alerts and the worklist lagged a settings
-- change by up to the sweep interval). Here rather than in the API's routes: the trigger
-- already holds the very rows it bumped, in the transaction of the change, whoever makes it
-- (an API route, the web settings page through it, an operator's SQL); the NOTIFY goes out at
-- that commit and not at all on rollback. Refills and custody changes need no NOTIFY here:
-- ingest and the API routes that make them send one already.

-- The payload of channels.pumps_changed_payload (jsonb's text is json.dumps's for ASCII
-- serials: `{"serials": ["A", "B"]}`, sorted), or `{"serials": null}` (re-read them all) past
-- its 7000 bytes: PostgreSQL refuses a payload of 8000 bytes. Nothing is sent for no pumps.
CREATE FUNCTION pump_forecasts_wake(serials text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    IF cardinality(serials) > 0 THEN
        payload := jsonb_build_object('serials', to_jsonb(serials))::text;
        IF octet_length(payload) > 7000 THEN
            payload := jsonb_build_object('serials', NULL)::text;
        END IF;
        PERFORM pg_notify('pumpwatch_ingest', payload);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION pump_forecasts_patient() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bumped text[];
BEGIN
    IF NEW.withdrawal_risk IS DISTINCT FROM OLD.withdrawal_risk
       OR NEW.low_alarm_margin_ml IS DISTINCT FROM OLD.low_alarm_margin_ml THEN
        WITH changed AS (
            UPDATE pump_forecasts SET version = version + 1
            WHERE serial IN (SELECT serial FROM pump_forecasts WHERE patient_id = NEW.id
                             ORDER BY serial FOR UPDATE)
            RETURNING serial
        )
        SELECT array_agg(serial ORDER BY serial) INTO bumped FROM changed;
        PERFORM pump_forecasts_wake(bumped);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION pump_forecasts_clinic() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bumped text[];
BEGIN
    IF NEW.alert_settings IS DISTINCT FROM OLD.alert_settings
       OR NEW.timezone IS DISTINCT FROM OLD.timezone THEN
        -- In serial order, as the engine locks its batch (no deadlock with it).
        WITH changed AS (
            UPDATE pump_forecasts SET version = version + 1
            WHERE serial IN (SELECT serial FROM pump_forecasts WHERE clinic_id = NEW.id
                             ORDER BY serial FOR UPDATE)
            RETURNING serial
        )
        SELECT array_agg(serial ORDER BY serial) INTO bumped FROM changed;
        PERFORM pump_forecasts_wake(bumped);
    END IF;
    RETURN NULL;
END
$$;
