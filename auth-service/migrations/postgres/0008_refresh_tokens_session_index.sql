-- no-transaction
-- Deleting a session (AUTH_HISTORY_RETENTION) looks up refresh_tokens (a row per rotation,
-- kept 31 days) by the session's id: the foreign key's check, and the skip of a session
-- whose token rows are still there. Without this index each deleted session read the whole
-- table, and a batch outlasted statement_timeout.
--
-- CONCURRENTLY, as 0003: writes go on while it is built. A build cut short leaves an
-- INVALID refresh_tokens_by_session, which auth-service drops at its next start, before
-- migrating (CONCURRENT_INDEXES in store/postgres.rs), and this runs again.
CREATE INDEX CONCURRENTLY refresh_tokens_by_session ON refresh_tokens (session_id);
