-- Ingest moves each (pump, source) stream forward in one ordered upsert and needs each stream's
-- maximum as it was before: the upsert keeps it here (set by the statement that replaced it, and
-- returned by that statement). Before, a separate FOR UPDATE pass read it, and new streams were
-- created by a statement of their own.
ALTER TABLE sequence_state
    ADD COLUMN previous_max_seq         bigint,
    ADD COLUMN previous_max_recorded_at timestamptz;
