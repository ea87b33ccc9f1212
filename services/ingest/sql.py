"""Every SQL statement of the ingest service. Parameters only; nothing is built from input."""

READING_COLUMNS = (
    "msg_id",
    "serial",
    "recorded_at",
    "utc_offset_minutes",
    "received_at",
    "seq",
    "source_kind",
    "source_id",
    "model",
    "volume_ml",
    "capacity_ml",
    "low_alarm_ml",
    "basis",
    "drug_name",
    "concentration_mcg_per_ml",
    "infusion_mode",
    "rate_ml_per_day",
    "daily_dose_mcg",
    "schedule",
    "measured_flow_ml_per_day",
    "battery_pct",
    "battery_status",
    "alarms",
    "payload",
)
# The staged reading: the stored one and its source's firmware, which only pump_state keeps (the
# fleet's firmware without a look into each pump's newest payload).
STAGE_READING_COLUMNS = (*READING_COLUMNS, "source_firmware")
EVENT_COLUMNS = (
    "msg_id",
    "serial",
    "type",
    "recorded_at",
    "received_at",
    "seq",
    "source_kind",
    "source_id",
    "body",
    "payload",
)
STATE_COLUMNS = (
    "serial",
    "msg_id",
    "recorded_at",
    "utc_offset_minutes",
    "received_at",
    "model",
    "volume_ml",
    "capacity_ml",
    "low_alarm_ml",
    "basis",
    "drug_name",
    "concentration_mcg_per_ml",
    "infusion_mode",
    "rate_ml_per_day",
    "daily_dose_mcg",
    "schedule",
    "measured_flow_ml_per_day",
    "battery_pct",
    "battery_status",
    "alarms",
    "source_firmware",
)

# Created once per connection; rows vanish at each commit.
CREATE_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS stage_readings
    (LIKE readings INCLUDING DEFAULTS, source_firmware text) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_events
    (LIKE events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
"""

# The set of serials only grows; ingest remembers which exist and runs this only for ones it has
# not seen.
INSERT_PUMPS = """
INSERT INTO pumps (serial, model)
SELECT * FROM unnest($1::text[], $2::text[]) AS p(serial, model)
ORDER BY serial
ON CONFLICT (serial) DO NOTHING
"""

_READING_LIST = ", ".join(READING_COLUMNS)
_STATE_LIST = ", ".join(STATE_COLUMNS)
_STATE_UPDATES = ", ".join(f"{c} = EXCLUDED.{c}" for c in STATE_COLUMNS if c != "serial")
# One statement per batch of readings: the ledger decides which staged messages are new
# (ON CONFLICT (msg_id) DO NOTHING), only those become readings, and the newest of them per pump
# moves pump_state forward — never back: an older reading does not replace newer state. Rows are
# taken in key order so that concurrent writers lock them in the same order. Each new reading is
# added to its hour's rollup (readings_hourly) in the same statement; the hour's last volume is
# that of the greatest (recorded_at as epoch seconds, volume) pair, which needs no sort per hour
# as an ordered array_agg did. Returns the ids already in the ledger (duplicates: few, where
# the new ones are the whole batch, each an id to decode).
STORE_READINGS = f"""
WITH new AS (
    INSERT INTO ingested_messages (msg_id)
    SELECT msg_id FROM stage_readings ORDER BY msg_id
    ON CONFLICT DO NOTHING
    RETURNING msg_id
), kept AS (
    INSERT INTO readings ({_READING_LIST})
    SELECT {_READING_LIST} FROM stage_readings JOIN new USING (msg_id)
), state AS (
    INSERT INTO pump_state ({_STATE_LIST}, updated_at)
    SELECT DISTINCT ON (serial) {_STATE_LIST}, now()
    FROM stage_readings JOIN new USING (msg_id)
    ORDER BY serial, recorded_at DESC, msg_id
    ON CONFLICT (serial) DO UPDATE SET {_STATE_UPDATES}, updated_at = now()
    WHERE pump_state.recorded_at < EXCLUDED.recorded_at
), hourly AS (
    INSERT INTO readings_hourly AS h
    SELECT serial, date_trunc('hour', recorded_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
           count(*), sum(volume_ml), min(volume_ml), max(volume_ml), max(recorded_at),
           (max(ARRAY[date_part('epoch', recorded_at), volume_ml]))[2],
           count(measured_flow_ml_per_day), coalesce(sum(measured_flow_ml_per_day), 0),
           sum(rate_ml_per_day)
    FROM stage_readings JOIN new USING (msg_id)
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (serial, hour) DO UPDATE SET
        readings = h.readings + EXCLUDED.readings,
        volume_ml_sum = h.volume_ml_sum + EXCLUDED.volume_ml_sum,
        volume_ml_min = least(h.volume_ml_min, EXCLUDED.volume_ml_min),
        volume_ml_max = greatest(h.volume_ml_max, EXCLUDED.volume_ml_max),
        last_volume_ml = CASE WHEN EXCLUDED.last_at > h.last_at
                              THEN EXCLUDED.last_volume_ml ELSE h.last_volume_ml END,
        last_at = greatest(h.last_at, EXCLUDED.last_at),
        flow_readings = h.flow_readings + EXCLUDED.flow_readings,
        flow_ml_per_day_sum = h.flow_ml_per_day_sum + EXCLUDED.flow_ml_per_day_sum,
        rate_ml_per_day_sum = h.rate_ml_per_day_sum + EXCLUDED.rate_ml_per_day_sum
)
SELECT s.msg_id FROM stage_readings s WHERE NOT EXISTS (SELECT FROM new WHERE new.msg_id = s.msg_id)
"""

_EVENT_LIST = ", ".join(EVENT_COLUMNS)
STORE_EVENTS = f"""
WITH new AS (
    INSERT INTO ingested_messages (msg_id)
    SELECT msg_id FROM stage_events ORDER BY msg_id
    ON CONFLICT DO NOTHING
    RETURNING msg_id
), kept AS (
    INSERT INTO events ({_EVENT_LIST})
    SELECT {_EVENT_LIST} FROM stage_events JOIN new USING (msg_id)
    ORDER BY serial
)
SELECT s.msg_id FROM stage_events s WHERE NOT EXISTS (SELECT FROM new WHERE new.msg_id = s.msg_id)
"""

# Each stream of the batch moves forward in one upsert, rows in key order so that concurrent
# writers lock them in the same order (a new stream is inserted: no maximum before it). The row
# keeps the maximum it had before (and when the message holding it was recorded). Returned are
# only the streams whose batch does not just continue them ($5 the lowest number arrived, $6 how
# many distinct: the next numbers after that maximum, any consecutive run for a new stream;
# sequence.continues), with that maximum; the caller works out their gaps and late arrivals.
# (Most batches continue every stream: nothing comes back to decode.) Written so that no sum
# overflows bigint: numbers run from 0 to 2^63 - 1. The row lock also serialises gap filling per
# stream: a batch that fills part of a gap waits here until a concurrent batch that split the
# same gap has committed its pieces.
ADVANCE_SEQUENCE_STREAMS = """
WITH b AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::timestamptz[], $5::bigint[],
                         $6::bigint[]) AS b(serial, source_id, top, top_at, low, n)
), moved AS (
    INSERT INTO sequence_state AS st (serial, source_id, max_seq, max_recorded_at)
    SELECT b.serial, b.source_id, b.top, b.top_at FROM b
    ORDER BY b.serial, b.source_id
    ON CONFLICT (serial, source_id) DO UPDATE SET
        previous_max_seq = st.max_seq,
        previous_max_recorded_at = st.max_recorded_at,
        max_seq = GREATEST(st.max_seq, EXCLUDED.max_seq),
        max_recorded_at = CASE WHEN st.max_seq IS NULL OR EXCLUDED.max_seq > st.max_seq
                               THEN EXCLUDED.max_recorded_at ELSE st.max_recorded_at END,
        updated_at = now()
    RETURNING st.serial, st.source_id, st.previous_max_seq AS previous_max,
              st.previous_max_recorded_at AS previous_max_at
)
SELECT m.* FROM moved m JOIN b USING (serial, source_id)
WHERE NOT (b.top - b.low = b.n - 1 AND (m.previous_max IS NULL OR b.low - 1 = m.previous_max))
"""
LOCK_GAPS_HIT = """
SELECT g.id, coalesce(g.root_id, g.id) AS root, g.serial, g.source_id, g.first_missing,
       g.last_missing, g.detected_at, g.requests
FROM sequence_gaps g
WHERE EXISTS (
    SELECT 1 FROM unnest($1::text[], $2::text[], $3::bigint[]) AS l(serial, source_id, seq)
    WHERE g.serial = l.serial AND g.source_id = l.source_id
      AND l.seq BETWEEN g.first_missing AND g.last_missing
)
ORDER BY g.id
FOR UPDATE OF g
"""
DELETE_GAPS = "DELETE FROM sequence_gaps WHERE id = ANY($1::bigint[])"
# A newly found gap: first asked for once it has stood $7 seconds (a gap that commits in flight
# or several instances open for a moment closes by itself meanwhile).
INSERT_GAPS = """
INSERT INTO sequence_gaps (serial, source_id, first_missing, last_missing, before_at, after_at,
                           next_request_at)
SELECT g.*, now() + make_interval(secs => $7)
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::timestamptz[],
            $6::timestamptz[]) AS g
"""
# What is left of a gap after late arrivals: each piece keeps its gap's root, age, request state
# and missing period (run before the gap itself is deleted).
INSERT_GAP_PIECES = """
INSERT INTO sequence_gaps (root_id, serial, source_id, first_missing, last_missing, detected_at,
                           state, requests, next_request_at, last_requested_at,
                           unrecoverable_at, before_at, after_at)
SELECT coalesce(g.root_id, g.id), g.serial, g.source_id, p.first_missing, p.last_missing,
       g.detected_at, g.state, g.requests, g.next_request_at, g.last_requested_at,
       g.unrecoverable_at, g.before_at, g.after_at
FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS p(parent, first_missing, last_missing)
JOIN sequence_gaps g ON g.id = p.parent
"""
# Of the given roots, those with no piece left: gaps wholly recovered.
ROOTS_CLOSED = """
SELECT r.root FROM unnest($1::bigint[]) AS r(root)
WHERE NOT EXISTS (
    SELECT 1 FROM sequence_gaps g WHERE g.id = r.root OR g.root_id = r.root
)
"""

UPSERT_QUARANTINE = """
INSERT INTO quarantine (digest, topic, payload, payload_bytes, reason, detail,
                        first_received_at, last_received_at, occurrences)
SELECT q.digest, q.topic, q.payload, q.payload_bytes, q.reason, q.detail,
       q.received_at, q.received_at, q.occurrences
FROM unnest($1::bytea[], $2::text[], $3::bytea[], $4::integer[], $5::text[], $6::text[],
            $7::timestamptz[], $8::integer[])
     AS q(digest, topic, payload, payload_bytes, reason, detail, received_at, occurrences)
ORDER BY q.digest
ON CONFLICT (digest) DO UPDATE SET
    occurrences = quarantine.occurrences + EXCLUDED.occurrences,
    last_received_at = GREATEST(quarantine.last_received_at, EXCLUDED.last_received_at)
"""

COUNT_OPEN_GAPS = """
SELECT count(*) FILTER (WHERE state = 'open') AS gaps,
       coalesce(sum(last_missing - first_missing + 1) FILTER (WHERE state = 'open'), 0)
           AS missing,
       count(*) FILTER (WHERE state = 'unrecoverable') AS unrecoverable,
       coalesce(sum(last_missing - first_missing + 1) FILTER (WHERE state = 'unrecoverable'), 0)
           AS unrecoverable_missing
FROM sequence_gaps
"""

# -- backfill (services/ingest/backfill.py) ---------------------------------------------------

# Open gaps that have waited past the give-up time ($1 seconds since detection) are marked
# unrecoverable: never asked for again, kept for the record and the telemetry_gap alert. SKIP
# LOCKED: a gap a writer is filling right now is left to the next round.
GIVE_UP_GAPS = """
WITH due AS (
    SELECT id FROM sequence_gaps
    WHERE state = 'open' AND detected_at <= now() - make_interval(secs => $1)
    ORDER BY id
    FOR UPDATE SKIP LOCKED
)
UPDATE sequence_gaps g SET state = 'unrecoverable', unrecoverable_at = now()
FROM due WHERE g.id = due.id
RETURNING g.id, coalesce(g.root_id, g.id) AS root, g.serial, g.source_id, g.first_missing,
          g.last_missing, g.detected_at, g.requests, g.before_at, g.after_at
"""
# Claim up to $1 open gaps due for a request and move each one's next request out by backoff
# ($2 seconds doubled per request already made, at most $3), in one statement: a gap claimed by
# one ingest instance is locked (SKIP LOCKED) or no longer due for every other, so each request
# goes out once. Committed before the command is published: a crash in between costs one
# request, which the next due time repeats.
CLAIM_GAP_REQUESTS = """
WITH due AS (
    SELECT id FROM sequence_gaps
    WHERE state = 'open' AND next_request_at <= now()
    ORDER BY next_request_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE sequence_gaps g
SET requests = g.requests + 1,
    last_requested_at = now(),
    next_request_at = now() + make_interval(secs => least($2 * power(2, g.requests), $3))
FROM due WHERE g.id = due.id
RETURNING g.id, g.serial, g.source_id, g.first_missing, g.last_missing, g.requests
"""

ENSURE_PARTITION = "SELECT ensure_readings_partition($1)"
ENSURE_PARTITIONS_AHEAD = "SELECT ensure_readings_partitions_ahead(now(), $1)"
DROP_PARTITIONS_BEFORE = "SELECT drop_readings_partitions_before($1)"
PRUNE_LEDGER = """
DELETE FROM ingested_messages m
WHERE m.received_at < $1
  AND NOT EXISTS (SELECT 1 FROM events e WHERE e.msg_id = m.msg_id)
"""
