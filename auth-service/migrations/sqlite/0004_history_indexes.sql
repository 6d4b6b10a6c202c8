-- Indexes for housekeeping's retention of the history (AUTH_HISTORY_RETENTION): ended
-- sessions and timeline events older than it are deleted, oldest first, in batches; without
-- these each batch would read the whole table.

-- Ended sessions by when they ended. Partial: live sessions have no end.
CREATE INDEX sessions_ended_by_time ON sessions (ended_at)
    WHERE ended_at IS NOT NULL;

-- Timeline events by when they happened.
CREATE INDEX session_events_by_time ON session_events (at);
