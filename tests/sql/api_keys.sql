-- API keys: created once, stored hashed, checked by hash, listed without the key, revoked.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
SELECT plan(19);

SELECT dispatch.create_api_key('team-a') AS key_a \gset
SELECT dispatch.create_api_key('team-b') AS key_b \gset
SELECT matches(:'key_a'::text, '^pgd_[0-9a-f]{64}$', 'create_api_key returns pgd_ and 64 hex digits');
SELECT isnt(:'key_a'::text, :'key_b'::text, 'two keys differ');
SELECT results_eq($$SELECT name, created_at = now() FROM dispatch.api_keys()$$,
                  $$VALUES ('team-a', true), ('team-b', true)$$, 'api_keys() lists names and creation times');
SELECT is((SELECT key_hash FROM dispatch.api_keys WHERE name = 'team-a'), sha256(convert_to(:'key_a', 'UTF8')),
          'the table holds the SHA-256 of the key');
SELECT is((SELECT count(*) FROM dispatch.api_keys k WHERE strpos(row_to_json(k)::text, :'key_a') > 0
                                                      OR strpos(row_to_json(k)::text, substr(:'key_a', 5)) > 0),
          0::bigint, 'the key itself is stored nowhere');
SELECT is(dispatch.check_api_key(:'key_a'), true, 'check_api_key: a current key');
SELECT is(dispatch.check_api_key(:'key_b'), true, 'check_api_key: the other current key');
SELECT is(dispatch.check_api_key(upper(:'key_a')), false, 'check_api_key: keys are compared exactly');
SELECT is(dispatch.check_api_key('pgd_' || repeat('0', 64)), false, 'check_api_key: an unknown key');
SELECT is(dispatch.check_api_key(''), false, 'check_api_key: empty');
SELECT is(dispatch.check_api_key(NULL), false, 'check_api_key: NULL');

SELECT throws_ok($$SELECT dispatch.create_api_key(NULL)$$, '22023', 'key name is required', 'create_api_key: NULL name');
SELECT throws_ok($$SELECT dispatch.create_api_key('')$$, '22023', NULL, 'create_api_key: empty name');
SELECT throws_ok($$SELECT dispatch.create_api_key(repeat('k', 101))$$, '22023', NULL, 'create_api_key: name over 100');
SELECT throws_ok($$SELECT dispatch.create_api_key('team-a')$$, '22023', 'an API key named "team-a" exists; revoke it first',
                 'create_api_key: an existing name');

SELECT is(dispatch.revoke_api_key('team-a'), true, 'revoke_api_key: true when it existed');
SELECT is(dispatch.revoke_api_key('team-a'), false, 'revoke_api_key: false the second time');
SELECT is(dispatch.check_api_key(:'key_a'), false, 'a revoked key is no longer accepted');
SELECT results_eq($$SELECT name FROM dispatch.api_keys()$$, $$VALUES ('team-b')$$, 'api_keys() no longer lists it');

SELECT * FROM finish();
ROLLBACK;
