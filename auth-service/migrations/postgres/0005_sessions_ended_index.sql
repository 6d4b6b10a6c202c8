-- no-transaction
-- Housekeeping deletes ended sessions older than AUTH_HISTORY_RETENTION, oldest first, in
-- batches; without this index each batch would read every session ever opened. Partial:
-- live sessions have no end.
--
-- CONCURRENTLY, as 0003: writes go on while it is built. A build cut short leaves an
-- INVALID sessions_ended_by_time, which auth-service drops at its next start, before migrating
-- (CONCURRENT_INDEXES in store/postgres.rs), and this runs again.
CREATE INDEX CONCURRENTLY sessions_ended_by_time ON sessions (ended_at)
    WHERE ended_at IS NOT NULL;
