-- 012: the functions on a request's path keep one plan per session, as exchange does.
--
-- A PL/pgSQL statement with parameters is planned afresh for each of its first five
-- calls; after that PostgreSQL keeps the generic plan only if its estimated cost is no
-- higher than the custom plans' average, and otherwise plans every call again, for as
-- long as the session lives. submit_many's short path (010) was in that case: counted
-- with callgrind (bench/sqlcost.py), a one-request submit ran 3.70 million instructions
-- per call, half of them in the planner, and runs 1.59 million now. Its statements find
-- jobs through indexes whatever the parameters, so the generic plan is the one wanted;
-- tests/sql/plans.sql checks what they read after the table has grown. results (the
-- gateway reads each finished job with it) was planned on every call too: 0.32 -> 0.17
-- million per call. stream was not (its one statement takes the generic plan by
-- itself); it is fixed the same way so that no later change of its statement can fall
-- into this. tests/sql/catalog.sql checks the four functions on a request's path.

ALTER FUNCTION dispatch.submit_many(json, text) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION dispatch.results(bigint[]) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION dispatch.stream(json) SET plan_cache_mode = force_generic_plan;
