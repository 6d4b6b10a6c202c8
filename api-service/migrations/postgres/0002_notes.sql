-- Notes: the sample business resource (src/notes/), every row owned by one openid. The
-- PostgreSQL twin of migrations/sqlite/0002_notes.sql. Instants are BIGINT milliseconds since
-- the Unix epoch.
--
-- `seq` orders the listing, newest first, and is what a page cursor holds. An identity never
-- hands out a number twice, but concurrent transactions may commit their numbers out of
-- order; src/notes/postgres.rs therefore creates a user's notes under a per-user advisory
-- lock, so that within one user's notes (the only ones a listing reads) seq order is commit
-- order and a keyset page `seq < cursor` neither repeats nor skips a note while others are
-- created or deleted between pages. `id` is the public, random (UUID v4) identifier, kept in
-- its canonical text form; seq never leaves the service except inside an opaque cursor.
CREATE TABLE notes (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    openid     TEXT NOT NULL,
    title      TEXT NOT NULL,
    body       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- A user's notes, newest first: WHERE openid = $1 AND seq < $2 ORDER BY seq DESC.
CREATE INDEX notes_by_owner ON notes (openid, seq);

-- Idempotency-Key on POST /v1/notes: the first answer to a key, kept so that a retry gets it
-- again instead of a second note. Keys are scoped to the user (the primary key). The row is
-- written in the same transaction as the note it answers for, so neither exists without the
-- other. `fingerprint` is the SHA-256 of the canonical request: the same key with another
-- request is refused (422 idempotency_key_reused). `note_id` is deliberately not a foreign
-- key: deleting the note must not let a retry create it again. Rows older than 48 hours are
-- forgotten and purged (`created_at`, indexed for the purge).
CREATE TABLE note_idempotency (
    openid      TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint BYTEA NOT NULL,
    note_id     TEXT NOT NULL,
    status      INTEGER NOT NULL,
    response    BYTEA NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (openid, key)
);

CREATE INDEX note_idempotency_by_age ON note_idempotency (created_at);
