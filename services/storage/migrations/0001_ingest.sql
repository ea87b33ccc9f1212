-- What ingest stores: pumps, readings (partitioned by month), events, the latest state per pump,
-- sequence gaps and quarantine. Every accepted message's id is in ingested_messages exactly once.

CREATE TABLE pumps (
    serial        text PRIMARY KEY,
    model         text,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    -- NULL: the pump sends telemetry but no clinic has registered it (shown as unassigned).
    patient_id    uuid
);

-- The dedup ledger. Readings are partitioned by recorded_at, and a unique index on a partitioned
-- table must include the partition key, so "each msg_id once" is enforced here instead.
CREATE TABLE ingested_messages (
    msg_id      uuid PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE readings (
    msg_id                   uuid NOT NULL,
    serial                   text NOT NULL,
    recorded_at              timestamptz NOT NULL,
    -- The offset recorded_at was given in: the pump's local time (flex schedules run in it).
    utc_offset_minutes       smallint NOT NULL,
    received_at              timestamptz NOT NULL,
    seq                      bigint,
    source_kind              text,
    source_id                text,
    model                    text,
    volume_ml                double precision NOT NULL,
    capacity_ml              double precision NOT NULL,
    low_alarm_ml             double precision,
    basis                    text,
    drug_name                text NOT NULL,
    concentration_mcg_per_ml double precision NOT NULL,
    infusion_mode            text NOT NULL,
    rate_ml_per_day          double precision NOT NULL,
    daily_dose_mcg           double precision,
    schedule                 jsonb,
    measured_flow_ml_per_day double precision,
    battery_pct              double precision,
    battery_status           text,
    alarms                   text[] NOT NULL DEFAULT '{}',
    payload                  json NOT NULL
) PARTITION BY RANGE (recorded_at);

CREATE INDEX readings_serial_recorded_at ON readings (serial, recorded_at DESC);

-- Monthly partitions, bounded in UTC, named readings_YYYY_MM. Safe to call concurrently.
CREATE FUNCTION ensure_readings_partition(ts timestamptz) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    lo   timestamptz := date_trunc('month', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    hi   timestamptz := (date_trunc('month', ts AT TIME ZONE 'UTC') + interval '1 month')
                        AT TIME ZONE 'UTC';
    name text := 'readings_' || to_char(ts AT TIME ZONE 'UTC', 'YYYY_MM');
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN false;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('pumpwatch.readings_partitions'));
    IF to_regclass(name) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I PARTITION OF readings FOR VALUES FROM (%L) TO (%L)',
                   name, lo, hi);
    RETURN true;
END
$$;

-- The current month and the next `months_ahead`; returns how many were created.
CREATE FUNCTION ensure_readings_partitions_ahead(from_time timestamptz, months_ahead integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    created integer := 0;
BEGIN
    FOR i IN 0..months_ahead LOOP
        IF ensure_readings_partition(from_time + make_interval(months => i)) THEN
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END
$$;

-- Retention is a partition drop: every partition wholly before `cutoff`. Returns their names.
CREATE FUNCTION drop_readings_partitions_before(cutoff timestamptz) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    part record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('pumpwatch.readings_partitions'));
    FOR part IN
        SELECT c.relname
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'readings'::regclass
          AND c.relname ~ '^readings_[0-9]{4}_[0-9]{2}$'
          AND (to_date(substr(c.relname, 10), 'YYYY_MM') + interval '1 month')
              <= (cutoff AT TIME ZONE 'UTC')
        ORDER BY c.relname
    LOOP
        EXECUTE format('DROP TABLE %I', part.relname);
        RETURN NEXT part.relname;
    END LOOP;
END
$$;

SELECT ensure_readings_partitions_ahead(now(), 3);

CREATE TABLE events (
    msg_id      uuid PRIMARY KEY,
    serial      text NOT NULL REFERENCES pumps (serial),
    type        text NOT NULL,
    recorded_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    seq         bigint,
    source_kind text,
    source_id   text,
    body        jsonb NOT NULL,
    payload     json NOT NULL
);

CREATE INDEX events_serial_recorded_at ON events (serial, recorded_at DESC);

-- The newest reading of each pump. Out-of-order readings never overwrite newer state.
CREATE TABLE pump_state (
    serial                   text PRIMARY KEY REFERENCES pumps (serial),
    msg_id                   uuid NOT NULL,
    recorded_at              timestamptz NOT NULL,
    utc_offset_minutes       smallint NOT NULL,
    received_at              timestamptz NOT NULL,
    model                    text,
    volume_ml                double precision NOT NULL,
    capacity_ml              double precision NOT NULL,
    low_alarm_ml             double precision,
    basis                    text,
    drug_name                text NOT NULL,
    concentration_mcg_per_ml double precision NOT NULL,
    infusion_mode            text NOT NULL,
    rate_ml_per_day          double precision NOT NULL,
    daily_dose_mcg           double precision,
    schedule                 jsonb,
    measured_flow_ml_per_day double precision,
    battery_pct              double precision,
    battery_status           text,
    alarms                   text[] NOT NULL DEFAULT '{}',
    updated_at               timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50);  -- room on each page for HOT updates: every reading rewrites a row

-- Per (pump, source) the highest seq seen; a source without an id is ''.
CREATE TABLE sequence_state (
    serial     text NOT NULL,
    source_id  text NOT NULL,
    max_seq    bigint,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (serial, source_id)
) WITH (fillfactor = 50);

-- Messages not (yet) received: a late arrival splits or removes its gap.
CREATE TABLE sequence_gaps (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    serial        text NOT NULL,
    source_id     text NOT NULL,
    first_missing bigint NOT NULL,
    last_missing  bigint NOT NULL,
    detected_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (first_missing <= last_missing)
);

CREATE INDEX sequence_gaps_key ON sequence_gaps (serial, source_id, first_missing);

-- Messages that could not be accepted, once per distinct (topic, payload).
CREATE TABLE quarantine (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    digest            bytea NOT NULL UNIQUE,
    topic             text NOT NULL,
    payload           bytea NOT NULL,
    payload_bytes     integer NOT NULL,
    reason            text NOT NULL,
    detail            text NOT NULL,
    first_received_at timestamptz NOT NULL,
    last_received_at  timestamptz NOT NULL,
    occurrences       integer NOT NULL DEFAULT 1
);

CREATE INDEX quarantine_last_received_at ON quarantine (last_received_at DESC);
CREATE INDEX quarantine_reason ON quarantine (reason);
