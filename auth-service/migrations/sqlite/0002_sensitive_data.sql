-- Sensitive data: the user's phone number, and the app's WeChat access_token.
-- Both are stored only AES-256-GCM sealed with a key derived from AUTH_TOKEN_KEY.

-- The phone number from getuserphonenumber (a JSON object), sealed and bound to the openid;
-- NULL until the user gave one.
ALTER TABLE users ADD COLUMN phone BLOB;
ALTER TABLE users ADD COLUMN phone_updated_at INTEGER;

-- The app's WeChat access_token, one row per appid. Renewed by one replica at a time: the
-- renewer holds a write transaction (BEGIN IMMEDIATE) while it asks WeChat.
CREATE TABLE wechat_access_tokens (
    appid      TEXT PRIMARY KEY NOT NULL,
    -- The token, sealed and bound to the appid.
    token      BLOB NOT NULL,
    -- When WeChat said it expires (milliseconds since the Unix epoch).
    expires_at INTEGER NOT NULL,
    -- 1 for the first token, one more at each renewal: tells "still the token that failed"
    -- from "already renewed by someone else".
    generation INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
