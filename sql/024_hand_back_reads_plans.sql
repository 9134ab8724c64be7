-- 024: a node's hand-back finds its leases through their index, however the table has
-- grown since the statistics were taken.
--
-- _hand_back requeues every job a node holds, when the daemon deregisters at shutdown
-- and when an operator revokes the node. Its UPDATE is planned at that call, on the
-- statistics of the moment: on a table analysed while it was small and grown since
-- (a new install before autovacuum's next ANALYZE), a sequential scan. Measured in
-- tests/sql/plans.sql (planned on three jobs, then 22,000 added): a deregister read
-- all 24,023 rows to hand back two. With sequential scans off in the function it reads
-- the node's range of jobs_leased_by (019), as 021 did for the status functions.

ALTER FUNCTION dispatch._hand_back(integer) SET enable_seqscan = off;
