-- 007: dispatch.jobs is vacuumed after a fixed number of row changes, not after a
-- fifth of the table has changed (PostgreSQL's default).
--
-- A job leaves the queue by an UPDATE; its old entry in jobs_queued (and
-- its leased entry in jobs_lease_expiry, once settled) stays in the index, marked
-- dead, until VACUUM removes it. Every lease scans the queue index from its head, so
-- it steps over every job leased since the last vacuum: measured by hand, a node
-- leasing 10 and settling 10 per call went from 626 to 290 calls a second after
-- 100,000 jobs had passed through without a vacuum (EXPLAIN: 272 index pages read to
-- lease 10 rows after 45,000), and back to 670-740 right after one. With the default
-- scale factor (0.2) a table that keeps a day of history is vacuumed only after
-- millions of jobs, so leasing would slow down in proportion to traffic.
--
-- Vacuuming this table is cheap: 0.07 s for 3.2 million rows with 40,000 jobs passed
-- through. index_cleanup is forced on because PostgreSQL skips the index pass when the
-- dead rows sit on fewer than 2 % of the table's pages, which in a table holding a
-- long history is always, and it is the index pass that removes the dead entries.
-- Autovacuum still looks at most once per autovacuum_naptime (1 minute by default).

ALTER TABLE dispatch.jobs SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000,
    vacuum_index_cleanup = on
);
