-- Sensitive data: the user's phone number, and the app's WeChat access_token.
-- Both are stored only AES-256-GCM sealed with a key derived from AUTH_TOKEN_KEY.

-- The phone number from getuserphonenumber (a JSON object), sealed and bound to the openid;
-- NULL until the user gave one.
ALTER TABLE users ADD COLUMN phone BYTEA;
ALTER TABLE users ADD COLUMN phone_updated_at BIGINT;

-- The app's WeChat access_token, one row per appid. Renewed by one replica at a time: the
-- renewer locks the row (SELECT ... FOR UPDATE) while it asks WeChat; the row is created
-- empty (generation 0) on the first lock, so that there is a row to lock.
CREATE TABLE wechat_access_tokens (
    appid      TEXT PRIMARY KEY,
    -- The token, sealed and bound to the appid; NULL until the first one.
    token      BYTEA,
    -- When WeChat said it expires (milliseconds since the Unix epoch).
    expires_at BIGINT,
    -- 0 before the first token, then one more at each renewal: tells "still the token that
    -- failed" from "already renewed by someone else".
    generation BIGINT NOT NULL DEFAULT 0,
    updated_at BIGINT,
    CHECK ((token IS NULL) = (expires_at IS NULL))
);
