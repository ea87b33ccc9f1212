-- Ingest adds every new reading to its hour's row of readings_hourly (one insert, then an update
-- per later reading of that pump and hour). At the default fillfactor (100) a page has no room
-- for the new row version, so each update moved the row to another page and added entries to
-- both indexes (the key and Grafana's `hour` index). With room left on each page the update
-- stays on its page and touches no index (a HOT update; neither indexed column changes), as
-- pump_state and sequence_state already do. Only pages written from now on keep the room; old
-- hours are not updated any more.
ALTER TABLE readings_hourly SET (fillfactor = 70);
