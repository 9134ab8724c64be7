-- LISTEN channels: any model name maps to a valid, stable channel; node channels;
-- what register and report hand a daemon to LISTEN on.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
SELECT plan(17);
GRANT ALL ON ALL TABLES IN SCHEMA pg_temp TO PUBLIC;
GRANT ALL ON ALL SEQUENCES IN SCHEMA pg_temp TO PUBLIC;

SELECT is(dispatch.model_channel('llama3'), 'dispatch_m_' || md5('llama3'), 'model_channel: dispatch_m_ and the md5 of the name');
SELECT is(dispatch.model_channel('llama3'), dispatch.model_channel('llama3'), 'model_channel: stable');
SELECT isnt(dispatch.model_channel('llama3'), dispatch.model_channel('Llama3'), 'model_channel: case matters');
SELECT is(dispatch.model_channel(NULL), NULL, 'model_channel: NULL for NULL');

-- 200 characters with slashes, colons and non-ASCII.
SELECT rpad('meta-llama/Llama-3.1-8B-Instruct:q4_K_M/ünïcødé/模型/', 200, 'é:/x') AS long_model \gset
SELECT is(length(:'long_model'), 200, 'the long model name has 200 characters');
SELECT ok(octet_length(:'long_model') > 200, 'and more bytes than characters (non-ASCII)');
SELECT is(length(dispatch.model_channel(:'long_model')), 43, 'model_channel: always 43 characters');
SELECT matches(dispatch.model_channel(:'long_model'), '^dispatch_m_[0-9a-f]{32}$',
               'model_channel: only lower-case letters, digits and _ (a valid unquoted identifier)');
SELECT isnt(dispatch.model_channel(:'long_model'), dispatch.model_channel(left(:'long_model', 199)),
            'model_channel: names differing in the last character get different channels');
SELECT lives_ok(format('LISTEN %s', dispatch.model_channel(:'long_model')), 'LISTEN on the channel of the long name works');
SELECT lives_ok(format('SELECT pg_notify(%L, %L)', dispatch.model_channel(:'long_model'), ''),
                'NOTIFY on the channel of the long name works');
UNLISTEN *;

SELECT is(dispatch.node_channel(42), 'dispatch_n_42', 'node_channel: dispatch_n_ and the node id');
SELECT is(dispatch.node_channel(NULL), NULL, 'node_channel: NULL for NULL');

SELECT is(dispatch.enroll('gpu-a'), 'dispatch_node_gpu_a', 'enroll gpu-a');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
CREATE TEMP TABLE reg AS SELECT * FROM dispatch.register('llamacpp', ARRAY['llama3', :'long_model']);
SELECT is((SELECT node_channel FROM reg), dispatch.node_channel((SELECT node_id FROM reg)),
          'register returns the node''s own channel');
SELECT is((SELECT model_channels FROM reg), ARRAY[dispatch.model_channel('llama3'), dispatch.model_channel(:'long_model')],
          'register returns one channel per model, in order');
SELECT is((SELECT model_channels FROM dispatch.report('healthy', NULL, NULL, ARRAY['m9'])), ARRAY[dispatch.model_channel('m9')],
          'report returns the channels of the models it now serves');
RESET SESSION AUTHORIZATION;

SELECT * FROM finish();
ROLLBACK;
