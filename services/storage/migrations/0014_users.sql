-- People sign in as themselves (HTTP contract 1.1): user accounts with an argon2id password,
-- one-time links (invitations, password resets), people's bearer tokens, failed sign-ins kept
-- where every API process sees them, and the audit log naming the person.

CREATE TABLE users (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email               text NOT NULL CHECK (email = lower(email) AND email LIKE '%_@_%'),
    display_name        text NOT NULL,
    role                text NOT NULL
        CHECK (role IN ('clinician', 'clinic_admin', 'admin', 'fleet')),
    clinic_id           uuid REFERENCES clinics (id),
    -- The argon2id PHC string; NULL until an invitation is accepted. Never leaves the database
    -- except to be verified.
    password_hash       text,
    password_changed_at timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    created_by          text NOT NULL,
    deactivated_at      timestamptz,
    CHECK ((role IN ('clinician', 'clinic_admin')) = (clinic_id IS NOT NULL))
);
CREATE UNIQUE INDEX users_email ON users (email);
CREATE INDEX users_clinic ON users (clinic_id, display_name);

-- One-time links: an invitation (choose a first password) or a password reset. Only the
-- SHA-256 of the link's random token is kept; a link is used once, before it expires.
CREATE TABLE user_links (
    token_hash bytea PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES users (id),
    purpose    text NOT NULL CHECK (purpose IN ('invitation', 'reset')),
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX user_links_user ON user_links (user_id);

-- People's bearer tokens (OAuth2 password flow): the token's SHA-256, an absolute end and the
-- last use (the idle timeout). Deleted at logout and when the user is deactivated.
CREATE TABLE user_tokens (
    token_hash   bytea PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id),
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    last_used_at timestamptz NOT NULL
);
CREATE INDEX user_tokens_user ON user_tokens (user_id);
CREATE INDEX user_tokens_expires_at ON user_tokens (expires_at);

-- The dashboard's sessions may be a person's (email and password) as well as a key's.
ALTER TABLE web_sessions
    ADD COLUMN user_id uuid REFERENCES users (id),
    ADD COLUMN last_used_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX web_sessions_user ON web_sessions (user_id);

-- Wrong passwords by the email typed (existing account or not) and source address: they slow
-- and then lock that email at that address, and many of them from everywhere lock the account
-- for addresses it never signed in from. Forgotten after a successful sign-in from the address.
CREATE TABLE signin_failures (
    email  text NOT NULL,
    source text NOT NULL,
    at     timestamptz NOT NULL
);
CREATE INDEX signin_failures_email ON signin_failures (email, at);
CREATE INDEX signin_failures_at ON signin_failures (at);

-- Addresses a person signed in from successfully: a stranger's failures elsewhere never lock
-- them out from these.
CREATE TABLE signin_sources (
    user_id        uuid NOT NULL REFERENCES users (id),
    source         text NOT NULL,
    last_signed_in timestamptz NOT NULL,
    PRIMARY KEY (user_id, source)
);

-- The audit log names the person (a user's token or web session), besides the key.
ALTER TABLE audit_log ADD COLUMN user_id uuid;
CREATE INDEX audit_log_user_at ON audit_log (user_id, at) WHERE user_id IS NOT NULL;

-- Tests only (PUMPWATCH_API_TEST_CLOCK): an offset added to the database's clock for sign-in,
-- tokens and lockout, so that expiry and idle timeouts are tested without waiting.
CREATE TABLE api_test_clock (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    offset_s  double precision NOT NULL
);

-- Who did it, as people read it: 'user:<id>' and 'key:<id>' (what the API records as actor)
-- become {"type": "user", "id", "display_name"} and {"type": "key", "id", "label"}; the
-- services' own names ('pumpwatch-alerts', ...) {"type": "service", "id": name}.
CREATE FUNCTION actor_json(actor text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN actor IS NULL THEN NULL
        WHEN actor ~ '^user:[0-9a-f-]{36}$' THEN coalesce(
            (SELECT jsonb_build_object('type', 'user', 'id', u.id, 'display_name', u.display_name)
             FROM users u WHERE u.id = substr(actor, 6)::uuid),
            jsonb_build_object('type', 'user', 'id', substr(actor, 6), 'display_name', NULL))
        WHEN actor ~ '^key:[0-9a-f-]{36}$' THEN coalesce(
            (SELECT jsonb_build_object('type', 'key', 'id', k.id, 'label', k.label)
             FROM api_keys k WHERE k.id = substr(actor, 5)::uuid),
            jsonb_build_object('type', 'key', 'id', substr(actor, 5), 'label', NULL))
        ELSE jsonb_build_object('type', 'service', 'id', actor)
    END
$$;
