-- The token tables by session: deleting a session (AUTH_HISTORY_RETENTION) looks up each
-- token table by the session's id, for the foreign keys and to skip a session whose token
-- rows are still there; without these, every deleted session read both tables whole.
CREATE INDEX access_tokens_by_session ON access_tokens (session_id);
CREATE INDEX refresh_tokens_by_session ON refresh_tokens (session_id);
