-- Snooze (HTTP contract 1.1): a person delays the re-notification of an alert until a time
-- (at most 24 h; a high alert at most 4 h), with a note. The alert stays as it is and is never
-- silenced: the condition worsening escalates it (and ends the snooze) as ever.
ALTER TABLE alerts
    ADD COLUMN snoozed_until timestamptz,
    ADD COLUMN snoozed_by    text,
    ADD COLUMN snooze_note   text;

ALTER TABLE alert_history DROP CONSTRAINT alert_history_action_check;
ALTER TABLE alert_history ADD CONSTRAINT alert_history_action_check
    CHECK (action IN ('opened', 'reopened', 'escalated', 'eased', 'acknowledged', 'resolved',
                      'notification_escalated', 'custody', 'snoozed'));
