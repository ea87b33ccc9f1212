-- Clinics and patients (the HTTP API manages them), booked refill visits, the alert lifecycle
-- with its history, the dose history the dose-escalation rule watches, and the outbox that the
-- notification worker delivers from.

CREATE TABLE clinics (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name           text NOT NULL,
    timezone       text NOT NULL DEFAULT 'UTC',
    -- Overrides of the per-clinic rule settings (services.domain.alerting.RuleSettings).
    alert_settings jsonb NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE patients (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    clinic_id           uuid NOT NULL REFERENCES clinics (id),
    mrn                 text NOT NULL,
    display_name        text NOT NULL,
    birth_date          date,
    withdrawal_risk     text NOT NULL DEFAULT 'standard'
                        CHECK (withdrawal_risk IN ('standard', 'high')),
    low_alarm_margin_ml double precision CHECK (low_alarm_margin_ml >= 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (clinic_id, mrn)
);

ALTER TABLE pumps
    ADD CONSTRAINT pumps_patient_id_fkey FOREIGN KEY (patient_id) REFERENCES patients (id),
    ADD COLUMN implanted_on date,
    -- The booked refill visit; the refill-due rules stay quiet while it comes in time.
    ADD COLUMN refill_appointment_at timestamptz;

CREATE INDEX pumps_patient_id ON pumps (patient_id);

CREATE TABLE alerts (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    serial          text NOT NULL REFERENCES pumps (serial),
    -- The pump's patient and clinic when the alert opened (NULL: unassigned pump).
    patient_id      uuid REFERENCES patients (id),
    clinic_id       uuid REFERENCES clinics (id),
    rule            text NOT NULL,
    priority        text NOT NULL CHECK (priority IN ('low', 'medium', 'high')),
    status          text NOT NULL CHECK (status IN ('open', 'acknowledged', 'resolved')),
    title           text NOT NULL,
    detail          text NOT NULL,
    facts           jsonb NOT NULL DEFAULT '{}',
    -- For an alert about one past event (a refill's discrepancy): which event.
    occurrence      text,
    opened_at       timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    acknowledged_at timestamptz,
    acknowledged_by text,
    resolved_at     timestamptz,
    resolved_by     text,
    resolution      text,
    -- The clock the condition was judged by (wall clock, or the data's in simulations).
    condition_at    timestamptz NOT NULL
);

-- At most one unresolved alert per pump and condition: two engines can never duplicate one.
CREATE UNIQUE INDEX alerts_one_unresolved ON alerts (serial, rule) WHERE status <> 'resolved';
CREATE INDEX alerts_last_resolved ON alerts (serial, rule, resolved_at DESC)
    WHERE status = 'resolved';
CREATE INDEX alerts_clinic_status ON alerts (clinic_id, status, priority);
CREATE INDEX alerts_status_opened ON alerts (status, opened_at DESC);

CREATE TABLE alert_history (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id      uuid NOT NULL REFERENCES alerts (id),
    at            timestamptz NOT NULL DEFAULT now(),
    -- 'pumpwatch-alerts' for the engine, 'key:<id>' for a person through the API.
    actor         text NOT NULL,
    action        text NOT NULL
                  CHECK (action IN ('opened', 'reopened', 'escalated', 'eased', 'acknowledged',
                                    'resolved')),
    from_status   text,
    to_status     text NOT NULL,
    from_priority text,
    to_priority   text NOT NULL,
    reason        text NOT NULL,
    facts         jsonb NOT NULL DEFAULT '{}'
);

CREATE INDEX alert_history_alert ON alert_history (alert_id, id);

-- Programmed daily doses as they changed, newest last (dose escalation, the dose chart).
CREATE TABLE dose_history (
    serial         text NOT NULL REFERENCES pumps (serial),
    at             timestamptz NOT NULL,
    daily_dose_mcg double precision NOT NULL,
    source         text NOT NULL,
    PRIMARY KEY (serial, at)
);

-- Every alert change, written in the transaction that made it; the notification worker
-- delivers from here (webhooks, email, MQTT) and marks what it has done.
CREATE TABLE outbox (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    event      text NOT NULL,
    alert_id   uuid REFERENCES alerts (id),
    clinic_id  uuid REFERENCES clinics (id),
    payload    jsonb NOT NULL
);

CREATE INDEX outbox_alert ON outbox (alert_id);
