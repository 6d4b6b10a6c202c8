-- no-transaction
-- Housekeeping deletes timeline events older than AUTH_HISTORY_RETENTION, oldest first, in
-- batches; without this index each batch would read the whole timeline.
--
-- CONCURRENTLY, as 0003: writes go on while it is built. A build cut short leaves an
-- INVALID session_events_by_time, which auth-service drops at its next start, before migrating
-- (CONCURRENT_INDEXES in store/postgres.rs), and this runs again.
CREATE INDEX CONCURRENTLY session_events_by_time ON session_events (at);
