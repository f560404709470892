-- Hodei schema, version 3: each log head keeps the highest (attempt, agent
-- sequence) stored for its job, in that order. An append whose lines are all
-- above it cannot repeat a stored line, so it skips the de-duplication read
-- and is one statement (see logs.rs). NULL: not known yet (heads written
-- before this migration, or by `finish` alone); such appends take the slow
-- path, which sets it.
ALTER TABLE log_heads
    ADD COLUMN attempt    integer,
    ADD COLUMN agent_last bigint;
