-- 021: the functions behind /metrics, /v1/status and the stuck-queue check read the
-- queued and leased jobs through their indexes, however the table has grown since
-- their session planned them.
--
-- capacity(), queues(), health(), nodes() and metrics() (which calls the first four)
-- count queued and leased jobs. The gateway calls them on its long-lived connections,
-- so a plan made on a new, nearly empty jobs table stays until autovacuum next
-- analyses it: a sequential scan, cheaper than an index for a few pages. Measured in
-- tests/sql/plans.sql (planned on three jobs, then 22,000 added): every call read the
-- whole table, metrics() five times over (120,115 rows for 4,000 queued and leased);
-- planned anew after ANALYZE, 12,096. With sequential scans off in these functions
-- their plans read the partial indexes of queued and leased jobs from the start
-- (metrics() 8,086 rows, the same query planned on three jobs). Their other tables
-- (nodes, settings, overrides) hold a row per node or setting, so an index read there
-- costs nothing that matters. 008 did the same for results() and extend().

ALTER FUNCTION dispatch.capacity() SET enable_seqscan = off;
ALTER FUNCTION dispatch.queues() SET enable_seqscan = off;
ALTER FUNCTION dispatch.health() SET enable_seqscan = off;
ALTER FUNCTION dispatch.nodes() SET enable_seqscan = off;
ALTER FUNCTION dispatch.metrics() SET enable_seqscan = off;
