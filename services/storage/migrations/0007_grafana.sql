-- Read views for the Grafana dashboards (deploy/grafana) and the read-only role that queries
-- them. Each view reads state and rollup tables (pumps, pump_state, readings_hourly, alerts,
-- events, sequence_gaps, quarantine), never a scan of `readings`: what a panel costs depends on
-- the fleet's size and the panel's time window, not on how much history is stored. The only
-- touches of `readings` are index probes for one row each (a pump's newest reading, for the
-- firmware of the source that sent it, which pump_state does not keep).
--
-- The role is created without LOGIN and without a password (a migration must not hold one): the
-- deployment sets them, e.g. `ALTER ROLE pumpwatch_grafana LOGIN PASSWORD '…'` (the compose
-- stack's `grafana-db-role` service does). Views run with their owner's rights, so the role needs
-- SELECT on the views alone: it cannot read a table, patients included.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pumpwatch_grafana') THEN
        CREATE ROLE pumpwatch_grafana NOLOGIN;
    END IF;
END
$$;

-- Settings applied when the role logs in: it never writes, and a runaway query is stopped.
ALTER ROLE pumpwatch_grafana SET default_transaction_read_only = on;
ALTER ROLE pumpwatch_grafana SET statement_timeout = '10s';

CREATE SCHEMA grafana;
REVOKE ALL ON SCHEMA grafana FROM PUBLIC;
GRANT USAGE ON SCHEMA grafana TO pumpwatch_grafana;

-- Time-window panels over history read index ranges, not whole tables.
CREATE INDEX readings_hourly_hour ON readings_hourly (hour);
CREATE INDEX events_refills_recorded_at ON events (recorded_at) WHERE type = 'refill';
CREATE INDEX sequence_gaps_detected_at ON sequence_gaps (detected_at);

-- Every pump with its newest reading. `reporting`: a reading within 24 hours (the web fleet
-- page's definition); `silent` otherwise, or never. The days to the low alarm project the newest
-- reading at its programmed average rate (flex steps averaged, boluses not counted).
CREATE VIEW grafana.pump_status AS
SELECT p.serial,
       coalesce(s.model, p.model, 'unknown') AS model,
       coalesce(fw.firmware, 'unknown') AS firmware,
       s.recorded_at AS last_reading_at,
       s.received_at AS last_received_at,
       extract(epoch FROM now() - s.recorded_at) / 3600.0 AS hours_since_reading,
       CASE WHEN s.recorded_at > now() - interval '24 hours' THEN 'reporting' ELSE 'silent' END
           AS reporting,
       s.basis,
       s.volume_ml,
       s.capacity_ml,
       coalesce(s.low_alarm_ml, 2.0) AS low_alarm_ml,
       s.rate_ml_per_day,
       CASE WHEN s.rate_ml_per_day > 0 THEN
           (s.volume_ml - coalesce(s.low_alarm_ml, 2.0)) / s.rate_ml_per_day
           - extract(epoch FROM now() - s.recorded_at) / 86400.0
       END AS days_to_low_alarm,
       s.battery_status,
       s.battery_pct,
       coalesce(s.alarms, '{}') AS alarms
FROM pumps p
LEFT JOIN pump_state s ON s.serial = p.serial
LEFT JOIN LATERAL (
    SELECT r.payload -> 'source' ->> 'firmware' AS firmware
    FROM readings r
    WHERE r.serial = s.serial AND r.recorded_at = s.recorded_at AND r.msg_id = s.msg_id
    LIMIT 1
) fw ON true;

-- Pumps by how soon they reach their low alarm; `bucket_order` sorts the buckets.
CREATE VIEW grafana.refill_horizon AS
SELECT serial, model, firmware, days_to_low_alarm,
       CASE WHEN last_reading_at IS NULL THEN 'no reading'
            WHEN days_to_low_alarm IS NULL THEN 'not infusing'
            WHEN days_to_low_alarm <= 0 THEN 'at or past alarm'
            WHEN days_to_low_alarm <= 7 THEN '0-7 d'
            WHEN days_to_low_alarm <= 14 THEN '7-14 d'
            WHEN days_to_low_alarm <= 30 THEN '14-30 d'
            WHEN days_to_low_alarm <= 60 THEN '30-60 d'
            WHEN days_to_low_alarm <= 90 THEN '60-90 d'
            ELSE '> 90 d'
       END AS bucket,
       CASE WHEN last_reading_at IS NULL THEN 9
            WHEN days_to_low_alarm IS NULL THEN 8
            WHEN days_to_low_alarm <= 0 THEN 0
            WHEN days_to_low_alarm <= 7 THEN 1
            WHEN days_to_low_alarm <= 14 THEN 2
            WHEN days_to_low_alarm <= 30 THEN 3
            WHEN days_to_low_alarm <= 60 THEN 4
            WHEN days_to_low_alarm <= 90 THEN 5
            ELSE 6
       END AS bucket_order
FROM grafana.pump_status;

-- One row per alarm active at a pump's newest reading.
CREATE VIEW grafana.device_alarms AS
SELECT s.serial, s.model, s.firmware, alarm
FROM grafana.pump_status s
CROSS JOIN LATERAL unnest(s.alarms) AS alarm;

-- Alerts not resolved (open or acknowledged): the alerts_status_opened index, not the history.
-- No patient, clinic or text: the rule, priority and pump say enough for the fleet view.
CREATE VIEW grafana.open_alerts AS
SELECT a.serial, a.rule, a.priority, a.status, a.opened_at, a.updated_at,
       coalesce(s.model, p.model, 'unknown') AS model
FROM alerts a
JOIN pumps p ON p.serial = a.serial
LEFT JOIN pump_state s ON s.serial = a.serial
WHERE a.status IN ('open', 'acknowledged');

-- Each refill with its discrepancy: expected residual − measured residual (positive: less left
-- than expected, over-delivery; negative: more left, under-delivery). Expected is what the
-- programmer reported (`expected_residual_ml`) or, as the contract says when it is absent, the
-- last reading before the refill advanced by the programmed rate — here the last reading of
-- the newest hourly rollup that ends before the refill (one primary-key probe per refill).
-- The alert engine's reconciliation also knows the previous refill and boluses; this view is
-- the contract's simple rule, for distributions and trends.
CREATE VIEW grafana.refill_discrepancies AS
SELECT e.serial, e.recorded_at,
       coalesce(s.model, p.model, 'unknown') AS model,
       (e.body ->> 'residual_ml')::double precision AS residual_ml,
       x.expected_residual_ml,
       x.expected_from,
       x.expected_residual_ml - (e.body ->> 'residual_ml')::double precision AS discrepancy_ml
FROM events e
JOIN pumps p ON p.serial = e.serial
LEFT JOIN pump_state s ON s.serial = e.serial
LEFT JOIN LATERAL (
    SELECT h.last_at, h.last_volume_ml, h.rate_ml_per_day_sum / h.readings AS rate_ml_per_day
    FROM readings_hourly h
    WHERE h.serial = e.serial AND h.hour <= e.recorded_at AND h.last_at <= e.recorded_at
    ORDER BY h.hour DESC
    LIMIT 1
) h ON NOT (e.body ? 'expected_residual_ml')
CROSS JOIN LATERAL (
    SELECT CASE WHEN e.body ? 'expected_residual_ml'
                THEN (e.body ->> 'expected_residual_ml')::double precision
                WHEN h.last_at IS NOT NULL
                THEN greatest(0.0, h.last_volume_ml - h.rate_ml_per_day
                                   * extract(epoch FROM e.recorded_at - h.last_at) / 86400.0)
           END AS expected_residual_ml,
           CASE WHEN e.body ? 'expected_residual_ml' THEN 'reported'
                WHEN h.last_at IS NOT NULL THEN 'last reading'
           END AS expected_from
) x
WHERE e.type = 'refill';

-- Messages missing between devices and the store, per (pump, source), while not filled.
CREATE VIEW grafana.sequence_gaps AS
SELECT g.serial, g.source_id, g.first_missing, g.last_missing,
       g.last_missing - g.first_missing + 1 AS missing_messages, g.detected_at,
       coalesce(s.model, 'unknown') AS model
FROM sequence_gaps g
LEFT JOIN pump_state s ON s.serial = g.serial;

-- Per hour: pumps that sent a reading recorded in it, and how many readings.
CREATE VIEW grafana.hourly_activity AS
SELECT hour, count(*) AS pumps_reporting, sum(readings) AS readings
FROM readings_hourly
GROUP BY hour;

-- Quarantined messages without their payloads.
CREATE VIEW grafana.quarantine AS
SELECT reason, topic, detail, payload_bytes, occurrences, first_received_at, last_received_at
FROM quarantine;

GRANT SELECT ON grafana.pump_status, grafana.refill_horizon, grafana.device_alarms,
    grafana.open_alerts, grafana.refill_discrepancies, grafana.sequence_gaps,
    grafana.hourly_activity, grafana.quarantine
    TO pumpwatch_grafana;
