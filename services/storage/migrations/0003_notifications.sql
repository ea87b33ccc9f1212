-- Clinic notifications: per-clinic routing, webhook targets, and the deliveries the notification
-- worker (inside `pumpwatch alerts`) makes from the outbox, with every attempt.

-- Routing per clinic (services.domain.notifications.NotificationSettings as JSON).
ALTER TABLE clinics ADD COLUMN notification_settings jsonb NOT NULL DEFAULT '{}';

-- Webhook targets; the HTTP API writes them (POST /v1/webhooks), the worker disables them.
CREATE TABLE webhooks (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    clinic_id            uuid NOT NULL REFERENCES clinics (id),
    url                  text NOT NULL,
    events               text[] NOT NULL,
    secret               text NOT NULL,          -- "whsec_<base64>", the current signing secret
    previous_secret      text,                   -- still signs until previous_secret_expires_at
    previous_secret_expires_at timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    created_by           text,
    disabled_at          timestamptz,
    disabled_reason      text,
    consecutive_failures integer NOT NULL DEFAULT 0,
    deleted_at           timestamptz
);

CREATE INDEX webhooks_clinic ON webhooks (clinic_id) WHERE deleted_at IS NULL;

-- The fan-out marks each outbox row it has turned into deliveries (several workers: SKIP
-- LOCKED); a trigger wakes the workers when rows arrive (delivered at commit).
ALTER TABLE outbox ADD COLUMN dispatched_at timestamptz;

CREATE INDEX outbox_undispatched ON outbox (id) WHERE dispatched_at IS NULL;

CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pumpwatch_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- One message to one target: a webhook URL, an email address or an MQTT topic. Delivered at
-- least once; `idempotency_key` is the message id the receiver dedupes on (`webhook-id`,
-- email Message-ID, the MQTT payload's id) and makes creating a delivery idempotent.
CREATE TABLE deliveries (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    outbox_id       bigint REFERENCES outbox (id),
    alert_id        uuid REFERENCES alerts (id),
    clinic_id       uuid REFERENCES clinics (id),
    event           text NOT NULL,
    channel         text NOT NULL CHECK (channel IN ('webhook', 'email', 'mqtt')),
    target          text NOT NULL,
    webhook_id      uuid REFERENCES webhooks (id),
    idempotency_key text NOT NULL UNIQUE,
    -- What is sent, fixed when the delivery is made so that every attempt sends the same:
    -- {"id", "type", "created_at", "data"}, plus the rendered message for email.
    payload         jsonb NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'failed', 'cancelled')),
    -- When it may first be sent (quiet hours delay low priority); retries run for the retry
    -- window from here.
    due_at          timestamptz NOT NULL,
    next_attempt_at timestamptz NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    -- Set while a worker holds the delivery (its lease runs until next_attempt_at); a lease
    -- that ran out without an attempt recorded was interrupted (crash) and is retried.
    claimed_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    failed_at       timestamptz,
    last_error      text
);

-- What the workers poll: due pending deliveries.
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
-- The API's "history of notifications" of an alert.
CREATE INDEX deliveries_alert ON deliveries (alert_id, created_at);
CREATE INDEX deliveries_webhook_pending ON deliveries (webhook_id) WHERE status = 'pending';
CREATE INDEX deliveries_outbox ON deliveries (outbox_id);

CREATE TABLE delivery_attempts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id uuid NOT NULL REFERENCES deliveries (id),
    at          timestamptz NOT NULL,
    channel     text NOT NULL,
    target      text NOT NULL,
    -- delivered, or why not: http_status (a non-2xx answer), redirect (3xx: never followed),
    -- timeout, network, blocked (address refused), rejected (SMTP refused), error,
    -- interrupted (the worker died mid-attempt).
    outcome     text NOT NULL,
    status_code integer,
    error       text,
    duration_ms double precision
);

CREATE INDEX delivery_attempts_delivery ON delivery_attempts (delivery_id, id);

-- Re-notifying an unacknowledged high alert is part of its history.
ALTER TABLE alert_history DROP CONSTRAINT alert_history_action_check;
ALTER TABLE alert_history ADD CONSTRAINT alert_history_action_check
    CHECK (action IN ('opened', 'reopened', 'escalated', 'eased', 'acknowledged', 'resolved',
                      'notification_escalated'));
