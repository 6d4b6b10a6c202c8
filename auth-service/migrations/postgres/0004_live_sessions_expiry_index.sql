-- no-transaction
-- Housekeeping's expiry looks every 5 minutes for live sessions past their refresh token's
-- expiry; without this index the planner could walk the primary key over every session ever
-- opened (sessions are kept). Partial: only live sessions.
--
-- CONCURRENTLY, as 0003 (see there for an interrupted build: drop
-- sessions_live_by_refresh_expiry, and it runs again).
CREATE INDEX CONCURRENTLY sessions_live_by_refresh_expiry ON sessions (refresh_expires_at)
    WHERE ended_at IS NULL;
