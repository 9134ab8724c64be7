#!/bin/sh
# Entry point of the pgdispatch-migrate image (docker/Dockerfile, target migrate):
# a one-shot job that
#   1. waits for the database (retrying until PGDISPATCH_WAIT_SECONDS have passed),
#   2. applies sql/NNN_*.sql with sql/migrate.sh (each once, under an advisory lock),
#   3. creates or updates the gateway's login role (member of dispatch_gateway),
#   4. enrolls the demo node (dispatch.enroll: role dispatch_node_<name>) or, when
#      it is already enrolled, sets its role's password,
# and exits 0. Running it again changes nothing but the passwords, which follow
# the environment.
#
# Environment:
#   DATABASE_URL                 libpq URL of a role that may create roles (unset:
#                                the PG* environment: PGHOST, PGUSER, PGPASSWORD, ...)
#   PGDISPATCH_WAIT_SECONDS      how long to wait for the database (default 120)
#   PGDISPATCH_GATEWAY_ROLE      gateway login role (default pgdispatch_gateway)
#   PGDISPATCH_GATEWAY_PASSWORD  its password (required unless the role is skipped
#                                with PGDISPATCH_GATEWAY_ROLE="")
#   PGDISPATCH_NODE_NAME         node to enroll (default demo; "" enrolls none)
#   PGDISPATCH_NODE_PASSWORD     its role's password (required when a node is named)
set -eu

DATABASE_URL=${DATABASE_URL:-}
wait_seconds=${PGDISPATCH_WAIT_SECONDS:-120}
gw_role=${PGDISPATCH_GATEWAY_ROLE-pgdispatch_gateway}
node=${PGDISPATCH_NODE_NAME-demo}
sql_dir=${PGDISPATCH_SQL_DIR:-/opt/pgdispatch/sql}
export PGCONNECT_TIMEOUT=${PGCONNECT_TIMEOUT:-5}

say() { echo "migrate: $*"; }

if [ -n "$gw_role" ]; then
    : "${PGDISPATCH_GATEWAY_PASSWORD:?PGDISPATCH_GATEWAY_PASSWORD must be set (or PGDISPATCH_GATEWAY_ROLE empty)}"
fi
if [ -n "$node" ]; then
    : "${PGDISPATCH_NODE_PASSWORD:?PGDISPATCH_NODE_PASSWORD must be set (or PGDISPATCH_NODE_NAME empty)}"
fi
# SCRAM-SHA-256 verifier of the password in $PW (what psql's \password sends): the
# server stores it as given, so the clear password never reaches its logs or
# pg_stat_statements. Passwords outside printable ASCII (which PostgreSQL would
# SASLprep first) are sent as they are.
scram() {
    PW=$1 perl -MDigest::SHA=hmac_sha256,sha256 -MMIME::Base64 -e '
        my $pw = $ENV{PW};
        if ($pw !~ /^[\x20-\x7e]*$/) { print $pw; exit 0; }
        open(my $r, "<:raw", "/dev/urandom") or die; read($r, my $salt, 16) == 16 or die;
        my $u = hmac_sha256($salt . pack("N", 1), $pw); my $t = $u;
        for (2 .. 4096) { $u = hmac_sha256($u, $pw); $t ^= $u; }
        my $b = sub { encode_base64($_[0], "") };
        print "SCRAM-SHA-256\$4096:", $b->($salt), "\$", $b->(sha256(hmac_sha256("Client Key", $t))),
              ":", $b->(hmac_sha256("Server Key", $t));'
}

# psql on DATABASE_URL, or on the PG* environment when it is unset.
db() { if [ -n "$DATABASE_URL" ]; then psql "$@" "$DATABASE_URL"; else psql "$@"; fi; }

# 1. Wait for the database, with a deadline.
start=$(date +%s)
last_report=0
while ! err=$(db -X -q -At -c 'SELECT 1' 2>&1 >/dev/null); do
    now=$(date +%s)
    if [ $((now - start)) -ge "$wait_seconds" ]; then
        say "the database did not answer within ${wait_seconds}s: $err" >&2
        exit 1
    fi
    if [ $((now - last_report)) -ge 10 ]; then
        say "waiting for the database: $(echo "$err" | head -1)"
        last_report=$now
    fi
    sleep 1
done
say "database is up after $(( $(date +%s) - start ))s"

export DATABASE_URL

# 2. Migrations.
# 3 + 4. Roles, in one transaction under the migration lock (two migrators racing
# do it once). Passwords travel as SCRAM verifiers in psql variables, quoted by
# format(%L), and statement logging is off for this transaction where the role may.
gw_secret=$([ -z "$gw_role" ] || scram "$PGDISPATCH_GATEWAY_PASSWORD")
node_secret=$([ -z "$node" ] || scram "$PGDISPATCH_NODE_PASSWORD")

setup() {
sh "$sql_dir/migrate.sh" || return 1
db -X -q -At -v ON_ERROR_STOP=1 \
     -v gw_role="$gw_role" -v gw_pw="$gw_secret" \
     -v node="$node" -v node_pw="$node_secret" <<'SQL'
SET client_min_messages = warning;
BEGIN;
DO $$ BEGIN
    PERFORM set_config('log_statement', 'none', true);
    PERFORM set_config('log_min_duration_statement', '-1', true);
    PERFORM set_config('pg_stat_statements.track_utility', 'off', true);
EXCEPTION WHEN OTHERS THEN NULL;  -- not allowed here: log as configured
END $$;
SELECT pg_advisory_xact_lock(hashtext('dispatch.migrate')) AS locked \gset

SELECT :'gw_role' <> '' AS want_gateway, :'node' <> '' AS want_node \gset

\if :want_gateway
SELECT format('CREATE ROLE %I LOGIN', :'gw_role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'gw_role') \gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'gw_role', :'gw_pw') \gexec
SELECT format('GRANT dispatch_gateway TO %I', :'gw_role')
 WHERE NOT pg_has_role(:'gw_role', 'dispatch_gateway', 'MEMBER') \gexec
\echo migrate: gateway role :gw_role ready
\endif

\if :want_node
SELECT NOT EXISTS (SELECT 1 FROM dispatch.nodes() WHERE name = :'node') AS new_node \gset
\if :new_node
SELECT dispatch.enroll(:'node', :'node_pw') AS node_role \gset
\echo migrate: enrolled node :node as role :node_role
\else
SELECT format('ALTER ROLE %I PASSWORD %L', role_name, :'node_pw')
  FROM dispatch.nodes() WHERE name = :'node' \gexec
\echo migrate: node :node already enrolled; password set
\endif
\endif
COMMIT;
SQL
}

# Every step is idempotent and transactional, so a failure that may be passing (the
# database restarting, a container network's DNS hiccup) is retried a few times
# within the deadline; a real error fails the same way each time and ends the job.
attempt=1
until setup; do
    if [ "$attempt" -ge 5 ] || [ $(( $(date +%s) - start )) -ge "$wait_seconds" ]; then
        say "failed after $attempt attempt(s)" >&2
        exit 1
    fi
    attempt=$((attempt + 1))
    say "retrying (attempt $attempt of 5) in 2s"
    sleep 2
done
say "done"
