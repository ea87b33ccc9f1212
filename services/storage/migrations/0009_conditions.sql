-- One clinical condition is one alert (services.domain.conditions). An alert is about a
-- condition; its rule is the condition's most advanced stage that holds and changes as the
-- condition worsens or eases (reservoir: refill due → low → empty; battery: ERI → EOS), so the
-- alert escalates instead of resolving as if the pump got better.
-- The condition of a rule: services.domain.conditions.condition_of, for the backfill and for
-- writers that name only the rule (tests/test_conditions.py keeps the two the same).
CREATE FUNCTION rule_condition(p_rule text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_rule IN ('refill_due_worst_case', 'refill_due', 'reservoir_low', 'reservoir_empty')
            THEN 'reservoir'
        WHEN p_rule IN ('battery_eri', 'battery_eos') THEN 'battery'
        ELSE p_rule
    END
$$;

ALTER TABLE alerts ADD COLUMN condition text;
UPDATE alerts SET condition = rule_condition(rule);
ALTER TABLE alerts ALTER COLUMN condition SET NOT NULL;

CREATE FUNCTION alerts_condition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.condition := coalesce(NEW.condition, rule_condition(NEW.rule));
    RETURN NEW;
END
$$;
CREATE TRIGGER alerts_condition BEFORE INSERT ON alerts
    FOR EACH ROW EXECUTE FUNCTION alerts_condition();

-- Unresolved alerts that are now parts of one condition: the most severe stays, the others
-- resolve into it (the engine's next evaluation words it afresh).
WITH ranked AS (
    SELECT id, status, priority, row_number() OVER (
        PARTITION BY serial, condition
        ORDER BY CASE priority WHEN 'high' THEN 3 WHEN 'medium' THEN 2 ELSE 1 END DESC,
                 array_position(ARRAY['refill_due_worst_case', 'refill_due', 'reservoir_low',
                                      'reservoir_empty', 'battery_eri', 'battery_eos'], rule)
                     DESC NULLS LAST,
                 opened_at
    ) AS n
    FROM alerts WHERE status <> 'resolved'
), merged AS (
    UPDATE alerts a SET status = 'resolved', resolved_at = now(),
           resolved_by = 'migration 0009',
           resolution = 'merged into the alert of the same condition', updated_at = now()
    FROM ranked WHERE ranked.id = a.id AND ranked.n > 1
    RETURNING a.id
)
INSERT INTO alert_history (alert_id, actor, action, from_status, to_status, from_priority,
                           to_priority, reason)
SELECT r.id, 'migration 0009', 'resolved', r.status, 'resolved', r.priority, r.priority,
       'merged into the alert of the same condition'
FROM ranked r JOIN merged m ON m.id = r.id;

DROP INDEX alerts_one_unresolved;
CREATE UNIQUE INDEX alerts_one_unresolved ON alerts (serial, condition) WHERE status <> 'resolved';
DROP INDEX alerts_last_resolved;
CREATE INDEX alerts_last_resolved ON alerts (serial, condition, resolved_at DESC)
    WHERE status = 'resolved';
