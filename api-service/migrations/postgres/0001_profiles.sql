-- Profiles: what the mini-program sends of its user (nickname, avatar). The PostgreSQL twin
-- of migrations/sqlite/0001_profiles.sql: instants are BIGINT milliseconds since the Unix
-- epoch, exactly as there, so both stores share one Rust representation.
CREATE TABLE profiles (
    openid     TEXT PRIMARY KEY,
    nickname   TEXT,
    avatar_url TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
