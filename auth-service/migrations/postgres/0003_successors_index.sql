-- no-transaction
-- Housekeeping's purge clears the successor pairs of rotations older than the grace window
-- (and its margin) every 5 minutes; without this index it read the whole refresh_tokens
-- table (a row per rotation, kept 31 days) inside its transaction, and once that outlasted
-- statement_timeout every purge rolled back and dead rows were never deleted again.
-- Partial: only rows that still hold a successor.
--
-- CONCURRENTLY (hence no transaction, and one statement per file): writes go on while it is
-- built, as a rolling upgrade needs. A build that is interrupted leaves an INVALID index and
-- this file unapplied; its next run then stops at "already exists", and the replica stays
-- NOT_SERVING: drop the leftover (DROP INDEX CONCURRENTLY refresh_tokens_successors_by_rotation)
-- and it runs again.
CREATE INDEX CONCURRENTLY refresh_tokens_successors_by_rotation ON refresh_tokens (rotated_at)
    WHERE successor IS NOT NULL;
