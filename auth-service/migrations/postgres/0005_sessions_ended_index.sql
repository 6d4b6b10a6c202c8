-- no-transaction
-- Housekeeping deletes ended sessions older than AUTH_HISTORY_RETENTION, oldest first, in
-- batches; without this index each batch would read every session ever opened. Partial:
-- live sessions have no end.
--
-- CONCURRENTLY, as 0003 (see there for an interrupted build: drop sessions_ended_by_time,
-- and it runs again).
CREATE INDEX CONCURRENTLY sessions_ended_by_time ON sessions (ended_at)
    WHERE ended_at IS NOT NULL;
