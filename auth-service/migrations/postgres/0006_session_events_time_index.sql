-- no-transaction
-- Housekeeping deletes timeline events older than AUTH_HISTORY_RETENTION, oldest first, in
-- batches; without this index each batch would read the whole timeline.
--
-- CONCURRENTLY, as 0003 (see there for an interrupted build: drop session_events_by_time,
-- and it runs again).
CREATE INDEX CONCURRENTLY session_events_by_time ON session_events (at);
