-- auth-service schema (PostgreSQL): the same tables as the SQLite schema, in PostgreSQL types.
-- Instants are BIGINT milliseconds since the Unix epoch.
-- Tokens are stored only as HMAC-SHA256 keyed hashes; session_keys only AES-GCM sealed.
-- Several replicas may apply this at once: sqlx's migrator holds an advisory lock meanwhile.

CREATE TABLE users (
    openid                 TEXT PRIMARY KEY,
    unionid                TEXT,
    -- The newest session_key, sealed (AES-256-GCM, bound to the openid).
    session_key            BYTEA NOT NULL,
    -- Keyed fingerprint of the newest session_key: tells "same key again" from a rotation.
    session_key_fp         BYTEA NOT NULL,
    -- The one before it, sealed; NULL until the first rotation.
    prev_session_key       BYTEA,
    session_key_updated_at BIGINT NOT NULL,
    created_at             BIGINT NOT NULL,
    updated_at             BIGINT NOT NULL
);

CREATE TABLE sessions (
    id                 TEXT PRIMARY KEY,
    openid             TEXT NOT NULL REFERENCES users (openid),
    device_id          TEXT,
    device_platform    TEXT,
    device_model       TEXT,
    created_at         BIGINT NOT NULL,
    last_active_at     BIGINT NOT NULL,
    -- Expiry of the newest refresh token: past it the session is over (reason `expired`).
    refresh_expires_at BIGINT NOT NULL,
    ended_at           BIGINT,
    end_reason         TEXT
);
-- Partial: only live sessions, what a login's policy decision and the session list read.
CREATE INDEX sessions_live_by_user ON sessions (openid) WHERE ended_at IS NULL;

CREATE TABLE access_tokens (
    hash       BYTEA PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions (id),
    expires_at BIGINT NOT NULL
);
CREATE INDEX access_tokens_by_expiry ON access_tokens (expires_at);

CREATE TABLE refresh_tokens (
    hash       BYTEA PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions (id),
    expires_at BIGINT NOT NULL,
    -- Set when this token was exchanged; a second exchange within the grace window gets
    -- the same successor pair, later ones are reuse.
    rotated_at BIGINT,
    -- The successor pair, sealed under a key derived from this very token; cleared after
    -- the grace window.
    successor  BYTEA
);
CREATE INDEX refresh_tokens_by_expiry ON refresh_tokens (expires_at);

CREATE TABLE session_events (
    -- Orders a user's timeline (larger is newer) and pages it (`before`).
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    openid              TEXT NOT NULL,
    session_id          TEXT NOT NULL,
    kind                TEXT NOT NULL,
    reason              TEXT,
    replaced_by_session TEXT,
    replaced_by_device  TEXT,
    at                  BIGINT NOT NULL
);
CREATE INDEX session_events_by_user ON session_events (openid, id);
