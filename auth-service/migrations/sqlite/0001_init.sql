-- auth-service schema (SQLite). Instants are INTEGER milliseconds since the Unix epoch.
-- Tokens are stored only as HMAC-SHA256 keyed hashes; session_keys only AES-GCM sealed.

CREATE TABLE users (
    openid                 TEXT PRIMARY KEY NOT NULL,
    unionid                TEXT,
    -- The newest session_key, sealed (AES-256-GCM, bound to the openid).
    session_key            BLOB NOT NULL,
    -- Keyed fingerprint of the newest session_key: tells "same key again" from a rotation.
    session_key_fp         BLOB NOT NULL,
    -- The one before it, sealed; NULL until the first rotation.
    prev_session_key       BLOB,
    session_key_updated_at INTEGER NOT NULL,
    created_at             INTEGER NOT NULL,
    updated_at             INTEGER NOT NULL
);

CREATE TABLE sessions (
    id                 TEXT PRIMARY KEY NOT NULL,
    openid             TEXT NOT NULL REFERENCES users (openid),
    device_id          TEXT,
    device_platform    TEXT,
    device_model       TEXT,
    created_at         INTEGER NOT NULL,
    last_active_at     INTEGER NOT NULL,
    -- Expiry of the newest refresh token: past it the session is over (reason `expired`).
    refresh_expires_at INTEGER NOT NULL,
    ended_at           INTEGER,
    end_reason         TEXT
);
CREATE INDEX sessions_live_by_user ON sessions (openid) WHERE ended_at IS NULL;

CREATE TABLE access_tokens (
    hash       BLOB PRIMARY KEY NOT NULL,
    session_id TEXT NOT NULL REFERENCES sessions (id),
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX access_tokens_by_expiry ON access_tokens (expires_at);

CREATE TABLE refresh_tokens (
    hash       BLOB PRIMARY KEY NOT NULL,
    session_id TEXT NOT NULL REFERENCES sessions (id),
    expires_at INTEGER NOT NULL,
    -- Set when this token was exchanged; a second exchange within the grace window gets
    -- the same successor pair, later ones are reuse.
    rotated_at INTEGER,
    -- The successor pair, sealed under a key derived from this very token; cleared after
    -- the grace window.
    successor  BLOB
) WITHOUT ROWID;
CREATE INDEX refresh_tokens_by_expiry ON refresh_tokens (expires_at);

CREATE TABLE session_events (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    openid              TEXT NOT NULL,
    session_id          TEXT NOT NULL,
    kind                TEXT NOT NULL,
    reason              TEXT,
    replaced_by_session TEXT,
    replaced_by_device  TEXT,
    at                  INTEGER NOT NULL
);
CREATE INDEX session_events_by_user ON session_events (openid, id);
