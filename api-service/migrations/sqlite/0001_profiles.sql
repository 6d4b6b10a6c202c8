-- Profiles: what the mini-program sends of its user (nickname, avatar). Instants are INTEGER
-- milliseconds since the Unix epoch. The phone number arrives with its own issue.
CREATE TABLE profiles (
    openid     TEXT PRIMARY KEY NOT NULL,
    nickname   TEXT,
    avatar_url TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
