-- Backfill (MQTT contract 1.1): a sequence gap is asked for from its source with `resend`
-- commands until it is filled, or given up on (`unrecoverable`) after the configured time.
--
-- A gap row carries its request state. `root_id` names the gap as first detected (NULL: the row
-- is that gap itself): when a late arrival splits or narrows a gap, the pieces keep the root's
-- id, detection time and request state, so a gap counts as recovered once (when its last piece
-- closes) and its age is never reset.
-- `before_at`/`after_at` are the recorded_at of the messages the source sent just before and
-- just after the missing ones (NULL where unknown): the missing period, in the alert's words.
ALTER TABLE sequence_gaps
    ADD COLUMN root_id           bigint,
    ADD COLUMN state             text NOT NULL DEFAULT 'open'
        CHECK (state IN ('open', 'unrecoverable')),
    ADD COLUMN requests          integer NOT NULL DEFAULT 0,
    ADD COLUMN next_request_at   timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN last_requested_at timestamptz,
    ADD COLUMN unrecoverable_at  timestamptz,
    ADD COLUMN before_at         timestamptz,
    ADD COLUMN after_at          timestamptz;

-- The backfill worker's two questions: which open gaps are due for a request, and which have
-- waited past the give-up time. Both only over open gaps (unrecoverable ones stay for the
-- record and the alert, and are never asked for again).
CREATE INDEX sequence_gaps_due ON sequence_gaps (next_request_at) WHERE state = 'open';
CREATE INDEX sequence_gaps_open_detected ON sequence_gaps (detected_at) WHERE state = 'open';
CREATE INDEX sequence_gaps_root ON sequence_gaps (root_id);

-- The recorded_at of the message holding max_seq: the start of the missing period of a gap
-- opened above it.
ALTER TABLE sequence_state ADD COLUMN max_recorded_at timestamptz;

-- The Grafana view gains the gap's state (appended: a view's existing columns stay put).
CREATE OR REPLACE VIEW grafana.sequence_gaps AS
SELECT g.serial, g.source_id, g.first_missing, g.last_missing,
       g.last_missing - g.first_missing + 1 AS missing_messages, g.detected_at,
       coalesce(s.model, 'unknown') AS model,
       g.state, g.requests, g.unrecoverable_at, g.before_at, g.after_at
FROM sequence_gaps g
LEFT JOIN pump_state s ON s.serial = g.serial;
