-- 008: looking jobs up by id never reads the whole table, however it has grown since
-- the session planned the lookup.
--
-- A session keeps the plan of a function's statement until the table's statistics
-- change, and autovacuum analyses a table at most once per autovacuum_naptime. The
-- gateway's first dispatch.results calls on a new or nearly empty jobs table were
-- planned as a sequential scan (cheaper than the primary key for a few pages), and
-- that plan stayed while thousands of jobs arrived, until the next analyze: measured
-- in the benchmark's B4 (a new database per repeat), 0.84 ms and 175 buffers per call
-- against 0.04 ms and 17 in a repeat whose table was analysed early; the gateway sends
-- one results call at a time, so every request waited on them. dispatch.extend joins
-- its arguments to the table and kept a sequential scan the same way
-- (tests/sql/plans.sql shows both). With sequential scans off in both functions, the
-- plans the planner has left read the primary key for the ids asked for.

ALTER FUNCTION dispatch.results(bigint[]) SET enable_seqscan = off;
ALTER FUNCTION dispatch.extend(bigint[], integer[]) SET enable_seqscan = off;
