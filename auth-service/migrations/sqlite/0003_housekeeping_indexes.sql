-- Indexes for the periodic housekeeping (every 5 minutes), which otherwise read whole tables
-- that only grow: refresh_tokens keeps a row per rotation for 31 days, sessions keeps every
-- session ever opened. Each is partial: it holds only the rows housekeeping looks for.

-- Purge: the successor pairs of rotations older than the grace window (and its margin).
CREATE INDEX refresh_tokens_successors_by_rotation ON refresh_tokens (rotated_at)
    WHERE successor IS NOT NULL;

-- Expiry: live sessions past their refresh token's expiry.
CREATE INDEX sessions_live_by_refresh_expiry ON sessions (refresh_expires_at)
    WHERE ended_at IS NULL;
