-- The HTTP API: API keys, the audit log, and hourly reading rollups (dashboard series, bucketed
-- telemetry) that ingest maintains in the statement that stores the readings.

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- SHA-256 of the key: keys are 256 random bits, so a fast hash is enough and the lookup is
    -- an index probe. The key itself is shown once and never stored.
    key_hash     bytea NOT NULL UNIQUE,
    role         text NOT NULL CHECK (role IN ('admin', 'clinician', 'integrator', 'fleet')),
    clinic_id    uuid REFERENCES clinics (id),
    label        text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text NOT NULL,
    last_used_at timestamptz,
    revoked_at   timestamptz,
    CHECK ((role IN ('clinician', 'integrator')) = (clinic_id IS NOT NULL))
);

-- Every read and change of patient data through the API. Append-only: the trigger refuses
-- UPDATE, DELETE and TRUNCATE for every role, the application's included.
CREATE TABLE audit_log (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    key_id        uuid,
    role          text,
    action        text NOT NULL,
    resource_type text NOT NULL,
    resource_id   text,
    clinic_id     uuid,
    outcome       text NOT NULL,
    status        smallint NOT NULL,
    source        text
);

CREATE INDEX audit_log_key_at ON audit_log (key_id, at);
CREATE INDEX audit_log_resource ON audit_log (resource_type, resource_id, at);

CREATE FUNCTION audit_log_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM PUBLIC;

-- Per pump and UTC hour: additive aggregates of the readings, so that late and out-of-order
-- readings merge in (ingest adds each new reading exactly once, in its ledger statement).
CREATE TABLE readings_hourly (
    serial            text NOT NULL,
    hour              timestamptz NOT NULL,
    readings          integer NOT NULL,
    volume_ml_sum     double precision NOT NULL,
    volume_ml_min     double precision NOT NULL,
    volume_ml_max     double precision NOT NULL,
    last_at           timestamptz NOT NULL,
    last_volume_ml    double precision NOT NULL,
    flow_readings     integer NOT NULL,
    flow_ml_per_day_sum double precision NOT NULL,
    rate_ml_per_day_sum double precision NOT NULL,
    PRIMARY KEY (serial, hour)
);

INSERT INTO readings_hourly
SELECT serial,
       date_trunc('hour', recorded_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
       count(*), sum(volume_ml), min(volume_ml), max(volume_ml), max(recorded_at),
       (array_agg(volume_ml ORDER BY recorded_at DESC))[1],
       count(measured_flow_ml_per_day), coalesce(sum(measured_flow_ml_per_day), 0),
       sum(rate_ml_per_day)
FROM readings
GROUP BY 1, 2;
