-- A clinic's alert list is found through the pumps it held (services/api/sql.py,
-- LIST_CLINIC_ALERTS): each pump's alerts by this index, so the list reads that clinic's
-- history whatever the size of the fleet. (The other indexes on serial are partial: unresolved
-- or resolved alerts only.)
CREATE INDEX alerts_serial_opened ON alerts (serial, opened_at DESC);
