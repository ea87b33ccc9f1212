-- Sign-in sessions of the web dashboard: an API key exchanged for a cookie. The cookie holds a
-- random token; only its SHA-256 is stored. Each session has its own CSRF token.

CREATE TABLE web_sessions (
    token_hash   bytea PRIMARY KEY,
    key_id       uuid REFERENCES api_keys (id),
    role         text NOT NULL,
    clinic_id    uuid REFERENCES clinics (id),
    csrf_token   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);

CREATE INDEX web_sessions_expires_at ON web_sessions (expires_at);
