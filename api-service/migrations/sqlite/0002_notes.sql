-- Notes: the sample business resource (src/notes/), every row owned by one openid. Instants
-- are INTEGER milliseconds since the Unix epoch.
--
-- `seq` orders the listing, newest first, and is what a page cursor holds. AUTOINCREMENT
-- never reuses a number, even after the newest note is deleted, and SQLite has one writer
-- at a time, so seq order is commit order: a keyset page `seq < cursor` neither repeats nor
-- skips a note while others are created or deleted between pages. `id` is the public,
-- random (UUID v4) identifier; seq never leaves the service except inside an opaque cursor.
CREATE TABLE notes (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    openid     TEXT NOT NULL,
    title      TEXT NOT NULL,
    body       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

-- A user's notes, newest first: WHERE openid = ? AND seq < ? ORDER BY seq DESC.
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
    fingerprint BLOB NOT NULL,
    note_id     TEXT NOT NULL,
    status      INTEGER NOT NULL,
    response    BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (openid, key)
) WITHOUT ROWID;

CREATE INDEX note_idempotency_by_age ON note_idempotency (created_at);
