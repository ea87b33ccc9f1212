-- Pump custody (HTTP contract 1.1). A pump belongs to at most one clinic at a time and, within
-- it, to at most one patient. Every period of custody is kept: a clinic and a patient see a
-- pump's readings, events, refills and alerts only for the periods in which it was theirs.
-- Alerts carry no owner of their own: who holds an alert follows from custody (alert_owner).

ALTER TABLE patients ADD CONSTRAINT patients_id_clinic UNIQUE (id, clinic_id);

ALTER TABLE pumps ADD COLUMN clinic_id uuid REFERENCES clinics (id);
UPDATE pumps p SET clinic_id = pt.clinic_id FROM patients pt WHERE pt.id = p.patient_id;
ALTER TABLE pumps
    -- A pump's patient is a patient of the pump's clinic.
    ADD CONSTRAINT pumps_patient_in_clinic
        FOREIGN KEY (patient_id, clinic_id) REFERENCES patients (id, clinic_id),
    ADD CONSTRAINT pumps_patient_has_clinic CHECK (patient_id IS NULL OR clinic_id IS NOT NULL);
CREATE INDEX pumps_clinic_id ON pumps (clinic_id);

CREATE TABLE pump_assignments (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    serial     text NOT NULL REFERENCES pumps (serial),
    clinic_id  uuid NOT NULL REFERENCES clinics (id),
    patient_id uuid REFERENCES patients (id),
    since      timestamptz NOT NULL,
    -- NULL: the current custody.
    until      timestamptz,
    -- How the period began: provisioned (admin, fleet), claimed (a claim code), assigned or
    -- moved (within the clinic), migrated (custody that existed before this migration).
    how        text NOT NULL
               CHECK (how IN ('provisioned', 'claimed', 'assigned', 'moved', 'migrated')),
    -- Who began it: 'key:<id>', 'user:<id>', 'cli'.
    actor      text NOT NULL,
    CHECK (until IS NULL OR until >= since)
);

CREATE UNIQUE INDEX pump_assignments_current ON pump_assignments (serial) WHERE until IS NULL;
CREATE INDEX pump_assignments_clinic ON pump_assignments (clinic_id, serial, since);
CREATE INDEX pump_assignments_patient ON pump_assignments (patient_id, serial, since)
    WHERE patient_id IS NOT NULL;

-- Custody that existed before: from the beginning of time, so nothing a clinic could read
-- before this migration disappears.
INSERT INTO pump_assignments (serial, clinic_id, patient_id, since, how, actor)
SELECT serial, clinic_id, patient_id, '-infinity', 'migrated', 'migration 0008'
FROM pumps WHERE clinic_id IS NOT NULL;

-- pumps.clinic_id and pumps.patient_id are the current custody; these triggers keep the
-- history, in the transaction that changes them, whoever writes (the API, a fixture, a COPY).
-- A patient given without a clinic brings their clinic (so does a new patient when the clinic
-- is left as it was).
CREATE FUNCTION pumps_custody_clinic() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.patient_id IS NOT NULL AND (
        NEW.clinic_id IS NULL
        OR (TG_OP = 'UPDATE' AND NEW.patient_id IS DISTINCT FROM OLD.patient_id
            AND NEW.clinic_id IS NOT DISTINCT FROM OLD.clinic_id)
    ) THEN
        SELECT clinic_id INTO NEW.clinic_id FROM patients WHERE id = NEW.patient_id;
    END IF;
    RETURN NEW;
END
$$;

-- A change of holder ends the current period and begins the next one at the same moment. The
-- first period of a pump begins at the beginning of time: its history before anyone held it
-- in pumpwatch (uploaded by the programmer that showed the claim code) is its first holder's.
-- A period after a time nobody held the pump begins when the last one ended. Giving a patient
-- to a pump its clinic holds for no patient completes that period instead of ending it: the
-- clinic's pump was the patient's. The writer names itself and the kind of change with
-- set_config('pumpwatch.actor', …, true) and set_config('pumpwatch.custody', …, true).
CREATE FUNCTION pumps_custody_history() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    current_row pump_assignments%ROWTYPE;
    began       timestamptz;
    actor       text := coalesce(nullif(current_setting('pumpwatch.actor', true), ''), current_user);
    how         text := coalesce(nullif(current_setting('pumpwatch.custody', true), ''), 'assigned');
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.clinic_id IS NOT DISTINCT FROM OLD.clinic_id
       AND NEW.patient_id IS NOT DISTINCT FROM OLD.patient_id THEN
        RETURN NULL;
    END IF;
    SELECT * INTO current_row FROM pump_assignments
    WHERE serial = NEW.serial AND until IS NULL FOR UPDATE;
    IF FOUND AND current_row.clinic_id = NEW.clinic_id AND current_row.patient_id IS NULL
       AND NEW.patient_id IS NOT NULL THEN
        UPDATE pump_assignments SET patient_id = NEW.patient_id WHERE id = current_row.id;
        RETURN NULL;
    END IF;
    IF FOUND THEN
        UPDATE pump_assignments SET until = now() WHERE id = current_row.id;
        began := now();
    ELSE
        SELECT coalesce(max(until), '-infinity') INTO began
        FROM pump_assignments WHERE serial = NEW.serial;
    END IF;
    IF NEW.clinic_id IS NOT NULL THEN
        INSERT INTO pump_assignments (serial, clinic_id, patient_id, since, how, actor)
        VALUES (NEW.serial, NEW.clinic_id, NEW.patient_id, began, how, actor);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER pumps_custody_clinic BEFORE INSERT OR UPDATE OF clinic_id, patient_id ON pumps
    FOR EACH ROW EXECUTE FUNCTION pumps_custody_clinic();
CREATE TRIGGER pumps_custody_history AFTER INSERT OR UPDATE OF clinic_id, patient_id ON pumps
    FOR EACH ROW EXECUTE FUNCTION pumps_custody_history();

-- Who holds a pump at a moment: its clinic and patient then (no row: nobody).
CREATE FUNCTION pump_holder(p_serial text, p_at timestamptz)
RETURNS TABLE (clinic_id uuid, patient_id uuid)
LANGUAGE sql STABLE AS $$
    SELECT a.clinic_id, a.patient_id FROM pump_assignments a
    WHERE a.serial = p_serial AND a.since <= p_at AND (a.until IS NULL OR a.until > p_at)
    ORDER BY a.since DESC
    LIMIT 1
$$;

-- Whether a clinic (and, if given, a patient) held the pump at a moment: the test every read
-- of a pump's history makes for a clinic's reader.
CREATE FUNCTION held_by(p_serial text, p_at timestamptz, p_clinic uuid, p_patient uuid)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM pump_assignments a
        WHERE a.serial = p_serial AND a.clinic_id = p_clinic
          AND (p_patient IS NULL OR a.patient_id = p_patient)
          AND a.since <= p_at AND (a.until IS NULL OR a.until > p_at)
    )
$$;

-- An alert belongs to the pump's holder: now while it is unresolved (assigning a pump hands
-- its open alerts to the new clinic at once; moving it moves them), and when it resolved after.
-- Ownership is this join, never a copy that could go stale.
DROP INDEX alerts_clinic_status;
ALTER TABLE alerts DROP COLUMN clinic_id, DROP COLUMN patient_id;

CREATE FUNCTION alert_clinic(p_serial text, p_resolved_at timestamptz) RETURNS uuid
LANGUAGE sql STABLE AS $$
    SELECT clinic_id FROM pump_holder(p_serial, coalesce(p_resolved_at, 'infinity'))
$$;

CREATE FUNCTION alert_patient(p_serial text, p_resolved_at timestamptz) RETURNS uuid
LANGUAGE sql STABLE AS $$
    SELECT patient_id FROM pump_holder(p_serial, coalesce(p_resolved_at, 'infinity'))
$$;

-- A custody change is part of the history of the pump's open alerts.
ALTER TABLE alert_history DROP CONSTRAINT alert_history_action_check;
ALTER TABLE alert_history ADD CONSTRAINT alert_history_action_check
    CHECK (action IN ('opened', 'reopened', 'escalated', 'eased', 'acknowledged', 'resolved',
                      'notification_escalated', 'custody'));

-- Claim codes a programmer showed (event type 'claim'): single use, a few tries per pump.
CREATE TABLE pump_claims (
    msg_id     uuid PRIMARY KEY,
    serial     text NOT NULL REFERENCES pumps (serial),
    used_at    timestamptz NOT NULL,
    clinic_id  uuid NOT NULL REFERENCES clinics (id),
    actor      text NOT NULL
);

-- Wrong claim codes, per pump: after a few within a window the pump takes no claim for a
-- while (a 6-character code must not be guessable by trying).
CREATE TABLE claim_failures (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    serial    text NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),
    clinic_id uuid,
    actor     text NOT NULL
);
CREATE INDEX claim_failures_serial_at ON claim_failures (serial, at);
