#!/bin/sh
# Applies sql/NNN_*.sql in order to the database named by DATABASE_URL (or the PG*
# environment). Each migration runs in its own transaction under an advisory lock,
# is recorded in dispatch.migrations, and is skipped once recorded: a second run
# applies nothing, and two migrators racing apply each file once.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
target=${DATABASE_URL:-}

run_psql() {
    if [ -n "$target" ]; then psql -X -q -v ON_ERROR_STOP=1 "$@" "$target"
    else psql -X -q -v ON_ERROR_STOP=1 "$@"; fi
}

run_psql <<'SQL'
SET client_min_messages = warning;
BEGIN;
SELECT pg_advisory_xact_lock(hashtext('dispatch.migrate')) \g /dev/null
CREATE SCHEMA IF NOT EXISTS dispatch;
CREATE TABLE IF NOT EXISTS dispatch.migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
COMMIT;
SQL

applied=0
for file in "$here"/[0-9][0-9][0-9]_*.sql; do
    [ -e "$file" ] || continue
    base=$(basename "$file" .sql)
    version=$(echo "$base" | cut -d_ -f1 | sed 's/^0*//')
    name=${base#*_}
    out=$( { cat <<SQL
SET client_min_messages = warning;
BEGIN;
SELECT pg_advisory_xact_lock(hashtext('dispatch.migrate')) \\g /dev/null
SELECT NOT EXISTS (SELECT 1 FROM dispatch.migrations WHERE version = $version) AS pending \gset
\if :pending
\echo applying $base
\i $file
INSERT INTO dispatch.migrations (version, name) VALUES ($version, '$name');
\endif
COMMIT;
SQL
    } | run_psql) || { echo "migrate: $base failed; nothing of it was applied" >&2; exit 1; }
    if [ -n "$out" ]; then echo "$out"; applied=$((applied + 1)); fi
done
echo "migrate: $applied migration(s) applied"
