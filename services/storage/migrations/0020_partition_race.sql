-- Two batches committing at once may both create next month's partition. The advisory lock
-- serialises them, but the second's catalog lookup after the lock can miss the table the first
-- just committed (an advisory lock does not make PostgreSQL re-read its catalog caches), so its
-- CREATE failed with duplicate_table and the batch was retried. Now that answer means "someone
-- else created it".
CREATE OR REPLACE FUNCTION ensure_readings_partition(ts timestamptz) RETURNS boolean
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
    BEGIN
        EXECUTE format('CREATE TABLE %I PARTITION OF readings FOR VALUES FROM (%L) TO (%L)',
                       name, lo, hi);
    EXCEPTION WHEN duplicate_table THEN
        RETURN false;
    END;
    RETURN true;
END
$$;
