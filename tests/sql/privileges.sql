-- Privileges: each role executes its own functions and nothing else; the gateway and
-- daemon roles touch no table; a node acts only as itself.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
SELECT plan(64);
GRANT ALL ON ALL TABLES IN SCHEMA pg_temp TO PUBLIC;
GRANT ALL ON ALL SEQUENCES IN SCHEMA pg_temp TO PUBLIC;

CREATE ROLE pgd_test_gw LOGIN IN ROLE dispatch_gateway;
CREATE ROLE pgd_test_admin LOGIN IN ROLE dispatch_admin;
CREATE ROLE pgd_test_nobody LOGIN;
SELECT is(dispatch.enroll('gpu-a'), 'dispatch_node_gpu_a', 'enroll gpu-a');
SELECT is(dispatch.enroll('gpu-b'), 'dispatch_node_gpu_b', 'enroll gpu-b');

------------------------------------------------------------------------------
-- The grant matrix, exactly
------------------------------------------------------------------------------
CREATE TEMP VIEW callable AS
    SELECT r.rolname, p.proname::text COLLATE "default" AS proname
    FROM pg_proc p CROSS JOIN (VALUES ('dispatch_gateway'), ('dispatch_daemon'), ('dispatch_admin')) r(rolname)
    WHERE p.pronamespace = 'dispatch'::regnamespace AND has_function_privilege(r.rolname, p.oid, 'EXECUTE');
SELECT results_eq($$SELECT proname FROM callable WHERE rolname = 'dispatch_gateway' ORDER BY 1$$,
    $$VALUES ('cancel'), ('capacity'), ('check_api_key'), ('health'), ('metrics'), ('model_channel'), ('models'),
             ('nodes'), ('results'), ('schema_version'), ('submit'), ('submit_many')$$,
    'the gateway role executes exactly the gateway functions');
SELECT results_eq($$SELECT proname FROM callable WHERE rolname = 'dispatch_daemon' ORDER BY 1$$,
    $$VALUES ('accept_pushes'), ('complete'), ('deregister'), ('exchange'), ('extend'), ('fail'), ('lease'), ('model_channel'),
             ('next_wake'), ('node_channel'), ('register'), ('report'), ('set_lease_ahead'), ('settle'), ('stream')$$,
    'the daemon role executes exactly the daemon functions');
SELECT results_eq($$SELECT proname FROM callable WHERE rolname = 'dispatch_admin' ORDER BY 1$$,
    $$VALUES ('api_keys'), ('cancel'), ('capacity'), ('check_api_key'), ('clear_capacity'), ('create_api_key'),
             ('disable'), ('drain'), ('enable'), ('enroll'), ('health'), ('metrics'), ('model_channel'), ('models'),
             ('node_channel'), ('nodes'), ('prune'), ('queues'), ('requeue'), ('results'), ('revoke'),
             ('revoke_api_key'), ('schema_version'), ('set_capacity'), ('set_setting'), ('settings'), ('submit'),
             ('submit_many')$$,
    'the admin role executes the operator and gateway functions');
SELECT is_empty($$SELECT * FROM callable WHERE proname LIKE '\_%'$$, 'no role executes an internal (_) function');

------------------------------------------------------------------------------
-- The daemon role
------------------------------------------------------------------------------
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((dispatch.register('llamacpp', ARRAY['m1'], 4)).node_name, 'gpu-a', 'gpu-a registers');
SELECT throws_ok($$SELECT * FROM dispatch.jobs$$, '42501', NULL, 'daemon: cannot read jobs');
SELECT throws_ok($$INSERT INTO dispatch.jobs (model, endpoint, payload, max_attempts) VALUES ('m1', '/x', '{}', 1)$$,
                 '42501', NULL, 'daemon: cannot insert jobs');
SELECT throws_ok($$UPDATE dispatch.jobs SET state = 'succeeded'$$, '42501', NULL, 'daemon: cannot update jobs');
SELECT throws_ok($$DELETE FROM dispatch.jobs$$, '42501', NULL, 'daemon: cannot delete jobs');
SELECT throws_ok($$TRUNCATE dispatch.jobs$$, '42501', NULL, 'daemon: cannot truncate jobs');
SELECT throws_ok($$SELECT * FROM dispatch.nodes$$, '42501', NULL, 'daemon: cannot read nodes');
SELECT throws_ok($$UPDATE dispatch.nodes SET admin_state = 'active'$$, '42501', NULL, 'daemon: cannot update nodes');
SELECT throws_ok($$UPDATE dispatch.settings SET value = 1$$, '42501', NULL, 'daemon: cannot change settings');
SELECT throws_ok($$SELECT * FROM dispatch.api_keys$$, '42501', NULL, 'daemon: cannot read api keys');
SELECT throws_ok($$INSERT INTO dispatch.capacity_overrides VALUES ('m1', 1)$$, '42501', NULL, 'daemon: cannot write overrides');
SELECT throws_ok($$SELECT dispatch.enroll('evil')$$, '42501', NULL, 'daemon: cannot enroll');
SELECT throws_ok($$SELECT dispatch.drain('gpu-b')$$, '42501', NULL, 'daemon: cannot drain');
SELECT throws_ok($$SELECT dispatch.revoke('gpu-b')$$, '42501', NULL, 'daemon: cannot revoke');
SELECT throws_ok($$SELECT dispatch.set_setting('lease_seconds', 1)$$, '42501', NULL, 'daemon: cannot change settings via set_setting');
SELECT throws_ok($$SELECT dispatch.set_capacity('m1', 1000)$$, '42501', NULL, 'daemon: cannot set capacity');
SELECT throws_ok($$SELECT dispatch.requeue(ARRAY[1::bigint])$$, '42501', NULL, 'daemon: cannot requeue');
SELECT throws_ok($$SELECT dispatch.prune()$$, '42501', NULL, 'daemon: cannot prune');
SELECT throws_ok($$SELECT * FROM dispatch.nodes()$$, '42501', NULL, 'daemon: cannot list nodes');
SELECT throws_ok($$SELECT dispatch.create_api_key('k')$$, '42501', NULL, 'daemon: cannot create api keys');
SELECT throws_ok($$SELECT dispatch.submit('m1', NULL, '{}')$$, '42501', NULL, 'daemon: cannot submit');
SELECT throws_ok($$SELECT * FROM dispatch.results(ARRAY[1::bigint])$$, '42501', NULL, 'daemon: cannot read results');
SELECT throws_ok($$SELECT dispatch.cancel(1)$$, '42501', NULL, 'daemon: cannot cancel');
SELECT throws_ok($$SELECT * FROM dispatch._capacity(NULL)$$, '42501', NULL, 'daemon: cannot call internal functions');
SELECT throws_ok($$SELECT dispatch._hand_back(1)$$, '42501', NULL, 'daemon: cannot hand back jobs directly');
SELECT throws_ok($$SET ROLE dispatch_node_gpu_b$$, '42501', NULL, 'daemon: cannot become another node''s role');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is((dispatch.register('llamacpp', ARRAY['m1'], 4)).node_name, 'gpu-b', 'gpu-b registers');
RESET SESSION AUTHORIZATION;

-- A node cannot lease, complete, fail or extend another node's job.
SELECT dispatch.submit('m1', NULL, '{}') AS j1 \gset
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT id FROM dispatch.lease(1)), :j1::bigint, 'gpu-a leases the job');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is_empty($$SELECT * FROM dispatch.lease(4)$$, 'gpu-b cannot lease a job gpu-a holds');
SELECT throws_ok(format('SELECT dispatch.complete(%s, 1, %L)', :j1, '{"forged": true}'), 'PD004', NULL,
                 'gpu-b cannot complete gpu-a''s job');
SELECT throws_ok(format('SELECT dispatch.fail(%s, 1, %L, false)', :j1, '{}'), 'PD004', NULL, 'gpu-b cannot fail gpu-a''s job');
SELECT is((SELECT ok FROM dispatch.extend(ARRAY[:j1::bigint], ARRAY[1])), false, 'gpu-b cannot extend gpu-a''s job');
SELECT results_eq(format($$SELECT kind FROM dispatch.exchange('[{"id": %s, "attempt": 1, "result": {}}]', 0)$$, :j1),
                  $$VALUES ('stale')$$, 'gpu-b''s exchange for gpu-a''s job is refused as stale');
SELECT is(dispatch.deregister(), 0, 'gpu-b''s deregister hands back nothing of gpu-a''s');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT jsonb_build_object('state', state, 'result', result, 'leased_by', leased_by) FROM dispatch.jobs WHERE id = :j1),
          jsonb_build_object('state', 'leased', 'result', NULL, 'leased_by', (SELECT id FROM dispatch.nodes WHERE name = 'gpu-a')),
          'gpu-a''s job is untouched');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT throws_ok($$SELECT * FROM dispatch.lease(1)$$, 'PD005', NULL, 'after deregister, gpu-b must register again (PD005)');
RESET SESSION AUTHORIZATION;

------------------------------------------------------------------------------
-- The gateway role
------------------------------------------------------------------------------
SET SESSION AUTHORIZATION pgd_test_gw;
SELECT ok(dispatch.submit('m1', NULL, '{}') > 0, 'gateway: can submit');
SELECT throws_ok($$SELECT * FROM dispatch.lease(1)$$, '42501', NULL, 'gateway: cannot lease');
SELECT throws_ok($$SELECT * FROM dispatch.exchange(NULL, 1)$$, '42501', NULL, 'gateway: cannot exchange');
SELECT throws_ok($$SELECT * FROM dispatch.settle(NULL)$$, '42501', NULL, 'gateway: cannot settle');
SELECT throws_ok($$SELECT dispatch.register('x', ARRAY['m1'])$$, '42501', NULL, 'gateway: cannot register');
SELECT throws_ok($$SELECT dispatch.complete(1, 1, '{}')$$, '42501', NULL, 'gateway: cannot complete');
SELECT throws_ok($$SELECT dispatch.fail(1, 1, '{}', false)$$, '42501', NULL, 'gateway: cannot fail');
SELECT throws_ok($$SELECT * FROM dispatch.extend(ARRAY[1::bigint], ARRAY[1])$$, '42501', NULL, 'gateway: cannot extend');
SELECT throws_ok($$SELECT dispatch.enroll('evil')$$, '42501', NULL, 'gateway: cannot enroll');
SELECT throws_ok($$SELECT dispatch.set_setting('lease_seconds', 1)$$, '42501', NULL, 'gateway: cannot change settings');
SELECT throws_ok($$SELECT dispatch.create_api_key('k')$$, '42501', NULL, 'gateway: cannot create api keys');
SELECT throws_ok($$SELECT * FROM dispatch.jobs$$, '42501', NULL, 'gateway: cannot read jobs');
SELECT throws_ok($$UPDATE dispatch.jobs SET state = 'cancelled'$$, '42501', NULL, 'gateway: cannot update jobs');
SELECT throws_ok($$SELECT * FROM dispatch.api_keys$$, '42501', NULL, 'gateway: cannot read api key hashes');
RESET SESSION AUTHORIZATION;

------------------------------------------------------------------------------
-- The admin role, and a role with no dispatch role at all
------------------------------------------------------------------------------
SET SESSION AUTHORIZATION pgd_test_admin;
SELECT is(dispatch.enroll('gpu-c'), 'dispatch_node_gpu_c', 'admin: can enroll (creates the role)');
SELECT is(dispatch.drain('gpu-c'), 'draining', 'admin: can drain');
SELECT is(dispatch.set_setting('lease_seconds', 30), 30::numeric, 'admin: can change settings');
SELECT is((SELECT count(*) FROM dispatch.jobs), 2::bigint, 'admin: can read the tables');
SELECT throws_ok($$UPDATE dispatch.jobs SET state = 'cancelled'$$, '42501', NULL, 'admin: cannot write the tables directly');
SELECT throws_ok($$SELECT * FROM dispatch.lease(1)$$, '42501', NULL, 'admin: cannot lease');
RESET SESSION AUTHORIZATION;

SET SESSION AUTHORIZATION pgd_test_nobody;
SELECT throws_ok($$SELECT dispatch.submit('m1', NULL, '{}')$$, '42501', NULL, 'no role: cannot submit');
SELECT throws_ok($$SELECT dispatch.check_api_key('x')$$, '42501', NULL, 'no role: cannot check keys');
RESET SESSION AUTHORIZATION;

SELECT * FROM finish();
ROLLBACK;
